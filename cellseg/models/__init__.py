"""Model bundles shipped with cellseg (one folder each: model.toml + weights.safetensors + README.md)."""

"""Bundles shipped with cellseg, one folder each (model.toml + weights.safetensors + README.md), found by name by
bundle.find_bundle: nuclei (the cell model, the default) and tissue (the tissue U-Net, tissue_unet)."""

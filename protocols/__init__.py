"""Analysis presets (TOML), installed as the cellseg.protocols package."""

"""Boxes, tiles, bands and instances: the plain numpy data every stage passes on. No torch.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "instances": ["HostInput", "Instances", "TileDetections", "TileDetector", "detection_frames", "no_candidates"],
    "maskrows": ["MaskRows"],
    "tiling": [
        "Band", "Box", "TileSpec", "check_halo", "grid_shape", "owned_box", "plan_bands", "plan_tiles",
        "seam_band_px",
    ],
})

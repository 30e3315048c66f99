"""Boxes, tiles, bands and instances: the plain numpy data every stage passes on. No torch.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "Band": "tiling",
    "Box": "tiling",
    "Instances": "instances",
    "MaskRows": "maskrows",
    "TileDetections": "instances",
    "TileDetector": "instances",
    "TileSpec": "tiling",
    "check_halo": "tiling",
    "detection_frames": "instances",
    "grid_shape": "tiling",
    "owned_box": "tiling",
    "plan_bands": "tiling",
    "plan_tiles": "tiling",
    "seam_band_px": "tiling",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

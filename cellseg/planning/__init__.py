"""Before any detection: the protocol (every setting), the slide's plan (tiles, tissue, intensity,
scale, windows), network input, and the annotated regions to count in.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "IntensityRange": "intensity",
    "NetworkInput": "plan",
    "OneOf": "protocol",
    "Protocol": "protocol",
    "Range": "protocol",
    "RegionFile": "regions",
    "Regions": "regions",
    "RegionsError": "regions",
    "SCHEMA": "protocol",
    "SETTINGS": "protocol",
    "Scale": "plan",
    "Setting": "protocol",
    "SlidePlan": "plan",
    "calibrate": "plan",
    "calibration_windows": "plan",
    "check_pixel_size": "protocol",
    "choose_scale": "plan",
    "list_protocols": "protocol",
    "load_protocol": "protocol",
    "load_regions": "regions",
    "measure_diameter": "plan",
    "measure_range": "intensity",
    "model_channel": "plan",
    "plan_slide": "plan",
    "protocols_dir": "protocol",
    "select_channels": "intensity",
    "tile_geometry": "plan",
    "tissue_pixels": "plan",
    "to_network_input": "intensity",
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

"""Where the tissue is: the tissue finders (U-Net, Otsu, none) and the tissue mask. The U-Net's torch code
is in cellseg.tissue.unet, imported only when it runs.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "METHODS": "methods",
    "TissueFinder": "finder",
    "TissueMask": "finder",
    "otsu_tissue": "finder",
    "view_side": "finder",
    "write_tissue_png": "finder",
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

"""Reading slides lazily: `open_slide` picks a backend (one private module each) behind one `Slide`
interface; unreadable regions and the pixel cache wrap it.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "CachedSlide": "cache",
    "KEPT_BYTES": "cache",
    "Slide": "base",
    "SlideInfo": "base",
    "UnreadableRegion": "unreadable",
    "looks_like_slide": "opening",
    "open_slide": "opening",
    "sniff": "opening",
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

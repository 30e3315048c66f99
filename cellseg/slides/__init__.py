"""Reading slides lazily: `open_slide` picks a backend (one private module each) behind one `Slide`
interface; unreadable regions and the pixel cache wrap it.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "base": ["Slide", "SlideInfo", "series_choice", "t_choice", "z_choice", "z_text"],
    "cache": ["CachedSlide", "KEPT_BYTES"],
    "opening": ["looks_like_slide", "open_slide", "sniff"],
    "unreadable": ["UnreadableRegion"],
})

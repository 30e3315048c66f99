"""Where the tissue is: the tissue finders (U-Net, Otsu, none) and the tissue mask. The U-Net's torch code
is in cellseg.tissue.unet, imported only when it runs.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "finder": ["TissueFinder", "TissueMask", "otsu_tissue", "view_side", "write_tissue_png"],
    "methods": ["METHODS"],
})

"""The torch code of counting: the Mask R-CNN, its tile-aware parts, precision, test-time augmentation
and the Detector the pipeline calls.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "detector": ["CANDIDATE_FLOOR", "Detector", "paste_masks_at_box_size", "resolve_device"],
    "network": ["build_model", "load_network"],
    "precision": ["cpu_flags", "cpu_has_native_bf16", "cpu_model", "resolve_precision", "runtime_environment"],
    "roi_align": ["MatrixMultiScaleRoIAlign", "matrix_roi_pools", "roi_align_rows"],
    "slide_norm": ["SlideGroupNorm"],
    "streams": ["cpu_threads"],
    "tta": [
        "AugmentedDetector", "MEMBER_FLOOR", "VIEWS", "member_threshold", "merge_views", "unview_array",
        "unview_boxes", "view_array", "view_box", "view_boxes", "view_shape",
    ],
})

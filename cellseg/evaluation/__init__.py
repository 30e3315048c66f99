"""Scoring predictions against ground truth: matching, COCO AP, counts, and bundle validation.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "image_masks": ["ImageMasks", "SHARED_LABEL_PX", "annotation_rle", "coco_image_paths", "coco_images", "label_pieces",
                    "read_coco_json"],
    "overlap": ["box_pairs"],
    "scoring": ["check_report_folder", "evaluate", "load_image_masks", "match", "pair_iou", "summary_lines",
                "write_report"],
    "validate": [
        "VALIDATION_PROTOCOL", "above", "annotated_images", "annotated_regions", "card_figures", "image_folder", "predict", "score",
        "shared_images", "validate_bundle", "validation_detector",
    ],
})

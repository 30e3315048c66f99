"""Scoring predictions against ground truth: matching, COCO AP, counts, and bundle validation.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "ImageMasks": "image_masks",
    "VALIDATION_PROTOCOL": "validate",
    "above": "validate",
    "annotated_images": "validate",
    "annotation_rle": "image_masks",
    "box_pairs": "overlap",
    "card_figures": "validate",
    "coco_image_paths": "image_masks",
    "coco_images": "image_masks",
    "evaluate": "scoring",
    "load_image_masks": "scoring",
    "match": "scoring",
    "pair_iou": "scoring",
    "predict": "validate",
    "read_coco_json": "image_masks",
    "score": "validate",
    "shared_images": "validate",
    "summary_lines": "scoring",
    "validate_bundle": "validate",
    "validation_detector": "validate",
    "write_report": "scoring",
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

"""The torch code of counting: the Mask R-CNN, its tile-aware parts, precision, test-time augmentation
and the Detector the pipeline calls.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "AugmentedDetector": "tta",
    "Detector": "detector",
    "MEMBER_FLOOR": "tta",
    "SlideGroupNorm": "slide_norm",
    "ThreadedMultiScaleRoIAlign": "rcnn_parts",
    "VIEWS": "tta",
    "build_model": "network",
    "cpu_flags": "precision",
    "cpu_has_native_bf16": "precision",
    "cpu_model": "precision",
    "load_network": "network",
    "member_threshold": "tta",
    "merge_views": "tta",
    "paste_masks_at_box_size": "detector",
    "resolve_device": "detector",
    "resolve_precision": "precision",
    "thread_roi_pools": "rcnn_parts",
    "unview_array": "tta",
    "unview_boxes": "tta",
    "view_array": "tta",
    "view_box": "tta",
    "view_boxes": "tta",
    "view_shape": "tta",
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

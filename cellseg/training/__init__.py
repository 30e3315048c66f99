"""Training a nucleus model on your own annotated images: data, crops, the training loop with
checkpoints, and the Mask R-CNN task. Dataset-specific recipes live in references/.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "Augmentation": "augment",
    "LoopSettings": "loop",
    "TrainImage": "data",
    "TrainSettings": "maskrcnn",
    "TrainingState": "checkpoint",
    "augment_pixels": "augment",
    "check_output_folder": "checkpoint",
    "dim_nuclei": "augment",
    "hed_jitter": "augment",
    "initial_weights": "warm_start",
    "load_coco": "data",
    "load_matching": "warm_start",
    "pack_masks": "crops",
    "prepare_for_training": "maskrcnn",
    "run_training": "loop",
    "sample_crop": "crops",
    "train": "maskrcnn",
    "train_image_from_labels": "data",
    "training_step": "maskrcnn",
    "unpack_masks": "crops",
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

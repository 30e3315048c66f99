"""Training a nucleus model on your own annotated images: data, crops, the training loop with
checkpoints, and the Mask R-CNN task. Dataset-specific recipes live in references/.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "augment": ["Augmentation", "augment_pixels", "dim_nuclei", "hed_jitter"],
    "checkpoint": ["TrainingState", "check_output_folder"],
    "copy_paste": ["paste_nuclei"],
    "crops": ["pack_masks", "sample_crop", "unpack_masks"],
    "data": ["TrainImage", "load_annotations", "load_coco", "resample", "train_image_from_labels", "window_of"],
    "finetune": ["HeldOut", "Recipe", "Verdict", "finetune", "split_heldout", "training_scale"],
    "loop": ["LoopSettings", "run_training"],
    "maskrcnn": ["TrainSettings", "keep_bundle_settings", "parameter_groups", "prepare_for_training", "train",
                 "training_step"],
    "warm_start": ["initial_weights", "load_matching", "starts_from_bundle"],
})

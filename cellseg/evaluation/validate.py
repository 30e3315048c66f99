"""Validate a model on held-out annotated images, the way users will run it, and tune its score threshold.

    bundle -> Detector at a low score floor -> CellCounter.count on every image (tiles, seams, measurement: what
    `cellseg count` does) -> predictions -> cellseg.evaluation.scoring against the annotations, sweeping the score
    threshold (0.3-0.95) -> the threshold with the best pooled F1 -> figures at that threshold -> model.toml

Used by `cellseg train --val` (a user's own held-out images) and references/nuclei/validate_bundle.py (the shipped
bundle's DSB2018 split, per modality). The threshold is chosen on the images it is then reported on: the
card says so.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import CellsegError
from ..planning import Protocol
from .image_masks import ImageMasks, coco_image_paths, field_image_masks, load_image_masks
from .label_pairs import annotated_fields, has_fields, is_label_folder, write_fields
from .scoring import DEFAULT_THRESHOLDS, EvaluationReport, evaluate, plot_sweep, write_report

log = logging.getLogger(__name__)

# Single annotated fields, not slides: every pixel is analysed (no tissue prefilter), in the default tiles.
VALIDATION_PROTOCOL = Protocol(name="validation", description="held-out annotated images", tile_size=512,
                               halo_px=64, min_area_px=10, tissue_method="none")
SCORE_FLOOR = float(DEFAULT_THRESHOLDS[0])   # predictions are kept down to the bottom of the sweep


@dataclass
class Validation:
    """What a validation measured: `at_floor` scores every prediction down to SCORE_FLOOR (its sweep and best
    threshold); `report` scores those kept at `threshold`, the bundle's default from then on."""

    at_floor: EvaluationReport
    report: EvaluationReport
    threshold: float

    @property
    def tuned(self) -> bool:
        """Whether `threshold` is the best-F1 one on these images; else it is the fallback `score` was given (nothing
        to choose by: a model that found no cells, or cells without scores)."""
        return _best_threshold(self.at_floor) is not None

    def lines(self) -> list[str]:
        """What it measured, for a person: summary_lines of `report`, whose last line (the best threshold of its own
        sweep) says instead how `threshold` was chosen, true also when there was nothing to choose by."""
        from .scoring import summary_lines
        figures = summary_lines(self.report)[:-1]
        if self.tuned:
            return figures + [f"best score threshold (max F1): {self.threshold:.2f} (F1 {self.at_floor.best_f1:.3f})"]
        why = ("no cells were found in these images" if self.at_floor.pooled["pred_count"] == 0 else
               "the cells found carry no scores")
        return figures + [f"best score threshold: none ({why})"]

    def sweep_table(self) -> dict:
        return {"thresholds": [s["threshold"] for s in self.at_floor.sweep],
                "f1": [round(s["f1"], 4) for s in self.at_floor.sweep],
                "cell_count": [s["pred_count"] for s in self.at_floor.sweep]}


def card_figures(report: EvaluationReport) -> dict:
    """The figures a model card gives for one group of images (`report` scored at the chosen threshold)."""
    return {"images": len(report.images),
            "ap50_tp_fp_fn_mean_over_images": _round(report.mean_over_images["ap_tp"]),
            "ap50_tp_fp_fn_pooled": _round(report.pooled["ap_tp"]),
            "f1_pooled": _round(report.pooled["f1"]),
            "dsb_score_mean_over_images": _round(report.mean_over_images.get("dsb_score")),
            "coco_mask_ap": _round(report.coco.get("ap")), "coco_mask_ap50": _round(report.coco.get("ap50")),
            "median_rel_count_error": _round(report.median_rel_count_error),
            # pooled (predicted - true) / true: negative when the model undercounts
            "count_bias_pooled": _round((report.pooled["pred_count"] - report.pooled["true_count"])
                                        / report.pooled["true_count"]) if report.pooled["true_count"] else None}


def validation_detector(bundle, device: str, floor: float = SCORE_FLOOR, mask_threshold: float | None = None,
                        tta: bool = False, precision: str = "fp32", modality: str | None = None):
    """The bundle's network as a Detector that keeps every cell scoring >= `floor` (with test-time augmentation
    when `tta`). Its mask threshold is the bundle's for `modality` (a protocol's; None: VALIDATION_PROTOCOL's)
    unless `mask_threshold` overrides it, as `cellseg count` takes it (run.counter.mask_threshold_for), so validated
    cells are the cells a count makes."""
    from ..detection import AugmentedDetector, Detector, member_threshold
    from ..run.counter import mask_threshold_for
    protocol = VALIDATION_PROTOCOL.replace(mask_threshold=mask_threshold, modality=modality)   # checks the range
    detector = Detector.from_bundle(bundle, device, score_threshold=member_threshold(floor) if tta else floor,
                                    mask_threshold=mask_threshold_for(bundle, protocol),
                                    precision=precision)
    return AugmentedDetector(detector, floor) if tta else detector


def annotated_images(source: Path) -> tuple[dict[str, ImageMasks], dict[str, Path]]:
    """The annotations of a COCO file (keyed by file_name; images relative to the file's folder) or of a folder of
    images with their label images (label_pairs; keyed by the image's path in the folder), and each image's path.
    Every image must exist and every label image fit its image: checked here, before any work is done."""
    if is_label_folder(source):
        fields = annotated_fields(source)
        return field_image_masks(fields, source), {field.name: field.image for field in fields}
    gt = load_image_masks(source)
    return gt, coco_image_paths(source, gt)


def annotated_regions(source: Path) -> list[tuple[Path, tuple | None]]:
    """What a COCO file or a folder of label pairs annotates, as (image, window (row0, col0, row1, col1) or None for
    all of it), checked as far as it can be without counting: every image there, every label image fitting it, a
    GeoJSON's fields readable. A held-out set (--val) is checked so before a training starts."""
    if is_label_folder(source):
        fields = annotated_fields(source)
        if all(field.window is None for field in fields):
            annotated_images(source)            # reads every label image against its image
        return [(field.image, field.window) for field in fields]
    _, paths = annotated_images(source)
    return [(path, None) for path in paths.values()]


def shared_images(train_source: Path, val_regions) -> list[str]:
    """The validation images (annotated_regions) that the training data (a COCO file or a folder of label pairs)
    also annotates, where a slide's fields overlap: figures on them are optimistic. [] when the training data cannot
    be read (reading it for training says what is wrong)."""
    try:
        trained = annotated_regions(train_source)
    except (CellsegError, OSError, ValueError, KeyError, TypeError):
        return []
    by_image: dict[Path, list] = {}
    for image, window in trained:
        by_image.setdefault(Path(image).resolve(), []).append(window)
    return [str(image) for image, window in val_regions
            if any(_overlap(window, w) for w in by_image.get(Path(image).resolve(), []))]


def _overlap(a, b) -> bool:
    """Whether two windows of one image overlap (None: all of it)."""
    if a is None or b is None:
        return True
    return max(a[0], b[0]) < min(a[2], b[2]) and max(a[1], b[1]) < min(a[3], b[3])


def image_folder(work: Path, index: int, name: str) -> Path:
    """The result folder `predict` counts the index-th of its images, named `name`, into."""
    return work / f"{index:05d}_{PurePosixPath(name).stem}"


def predict(detector, images: dict[str, Path], work: Path, model_diameter_px: float | None = None,
            diameter_px: float | str | None = None, reuse: bool = False,
            progress: bool = False, protocol: Protocol = VALIDATION_PROTOCOL,
            mpp: float | None = None) -> dict[str, ImageMasks]:
    """Count every image as `cellseg count` does (a CellCounter with `protocol` and `mpp` as --mpp; result folders
    under `work`) and return its cells, keyed like `images`. reuse: an image whose folder already holds predictions
    is not counted again."""
    from tqdm import tqdm

    from ..run import CellCounter
    from ..util import progress_interval
    counter = CellCounter(protocol, detector, model_diameter_px=model_diameter_px, diameter_px=diameter_px, mpp=mpp)
    predictions = {}
    for k, (name, path) in enumerate(tqdm(images.items(), desc="validate", unit="image", disable=not progress,
                                                      mininterval=progress_interval())):
        folder = image_folder(work, k, name)
        if not (reuse and (folder / "predictions.coco.json").is_file()):
            summary = counter.count(path, folder)
            log.info("%d/%d %s: %d cells", k + 1, len(images), name, summary["cell_count"])
        (cells,) = load_image_masks(folder).values()
        predictions[name] = dataclasses.replace(cells, file_name=name)   # paired with its annotations by name
    return predictions


def above(instances: ImageMasks, threshold: float) -> ImageMasks:
    """The cells scoring >= threshold."""
    keep = np.flatnonzero(np.asarray(instances.scores) >= threshold)
    return dataclasses.replace(instances, rles=[instances.rles[i] for i in keep], boxes=instances.boxes[keep],
                               scores=instances.scores[keep], iscrowd=instances.iscrowd[keep])


def score(predictions: dict[str, ImageMasks], gt: dict[str, ImageMasks],
          fallback_threshold: float) -> Validation:
    """Evaluate predictions made at SCORE_FLOOR: choose the best-F1 threshold, then score at it."""
    at_floor = evaluate(predictions, gt)
    best = _best_threshold(at_floor)
    threshold = best if best is not None else fallback_threshold
    report = evaluate({name: above(cells, threshold) for name, cells in predictions.items()}, gt)
    return Validation(at_floor, report, float(threshold))


def _best_threshold(at_floor: EvaluationReport) -> float | None:
    """The sweep's best-F1 threshold; None without a single cell (every threshold ties at F1 0: nothing chose it)."""
    return at_floor.best_threshold if at_floor.pooled["pred_count"] else None


def write_validation(validation: Validation, out_dir: Path) -> None:
    """metrics.json and per_image.csv at the chosen threshold, threshold_sweep.png over the whole sweep."""
    write_report(validation.report, out_dir)
    plot_sweep(validation.at_floor, out_dir / "threshold_sweep.png")


def validate_bundle(bundle_dir: Path, coco_json: Path, out_dir: Path, device: str = "auto",
                    progress: bool = True, protocol: Protocol | None = None) -> Validation:
    """Run the bundle on the annotated images of `coco_json`, write the report to `out_dir`, and store the best
    threshold (as the bundle's default) and the figures in its model.toml. protocol: the user's (`cellseg train
    -p`), whose name, modality, channel and mask threshold the images are counted with, as a count with it would
    (and its warnings name it); None: VALIDATION_PROTOCOL's."""
    from ..bundles import load_bundle, update_bundle_metadata
    bundle = load_bundle(bundle_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # fields of slides are counted as the windows they are, written as images beside the report
    gt, paths = annotated_images(write_fields(coco_json, out_dir / "heldout") if has_fields(coco_json) else coco_json)
    counting = VALIDATION_PROTOCOL if protocol is None else VALIDATION_PROTOCOL.replace(
        name=protocol.name, modality=protocol.modality, channel=protocol.channel)
    detector = validation_detector(bundle, device, mask_threshold=None if protocol is None else protocol.mask_threshold,
                                   modality=counting.modality)
    with tempfile.TemporaryDirectory(prefix=".work-", dir=out_dir) as work:   # result folders, then removed
        predictions = predict(detector, paths, Path(work), bundle.nucleus_diameter_px, progress=progress,
                              protocol=counting)
    validation = score(predictions, gt, bundle.score_threshold)
    write_validation(validation, out_dir)
    metrics = {"score_threshold": validation.threshold, "iou": 0.5, "val_images": len(gt),
               "val_data": str(coco_json),
               "threshold_chosen_on": ("these validation images (pooled F1)" if validation.tuned else
                                       "none: no scored cell found in these images, the bundle's default kept"),
               "all": card_figures(validation.report)}
    update_bundle_metadata(bundle_dir, score_threshold=validation.threshold,
                           card={"metrics": metrics, "threshold_sweep": validation.sweep_table()})
    return validation


def _round(x):
    return None if x is None else round(float(x), 4)

"""Fine-tuning a bundle on a user's few annotated images: what `cellseg train` does by default (docs/finetune.md).

    the user's COCO file -> annotated images at their own scale
      -> held-out images: --val, or split off automatically (whole images when there are enough, else a band of
         each image), written as image files + annotations.json into OUT/heldout/
      -> the rest resampled to the bundle's scale as `cellseg count` would resample them by default
         (planning.decide_scale: the pixel size with the bundle's scale in µm, else the median annotated nucleus)
      -> trained from the bundle by the Recipe; the held-out images are counted through CellCounter (what
         `cellseg count` does) at the start (step 0: the bundle as it is) and every so often, early stopping when
         they stop improving
      -> the best snapshot's weights become OUT's bundle, with the start bundle's thresholds, scale and
         normalisation, and the score threshold of the user's modality retuned on the held-out images
      -> a before/after table (printed, and in the card's [finetune] table); `verdict.better` False when the
         fine-tune does not beat the start bundle there (the CLI then exits non-zero unless --keep-anyway)

The held-out images choose the snapshot and the threshold and are then reported on: the figures are optimistic for
the fine-tune, and the card says so. benchmarks/finetune_few.py measures on images of the same kind that neither saw.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CellsegError
from .augment import Augmentation
from .data import TrainImage, resample, window_of

log = logging.getLogger(__name__)

HELDOUT_DIR = "heldout"            # OUT/heldout/: the held-out images and their annotations.json
SCORES_FILE = "finetune_scores.json"   # every scoring of the run, read back by --resume
WHOLE_IMAGES_FROM = 8              # with this many images or more, whole images are held out; else a band of each


@dataclass(frozen=True)
class Recipe:
    """How a bundle is fine-tuned on a few images (docs/finetune.md gives the measurements behind each choice)."""

    lr: float = 1e-4                  # peak rate of the heads, RPN and FPN
    backbone_lr_scale: float = 0.0    # the ResNet body's share of it: frozen (its gradients never computed)
    warmup: int = 10                  # steps: the bundle's weights are already good, a long warm-up wastes a short run
    # zoom 0.75-1.33x around the bundle's scale (the training images are resampled to it); the photometric
    # augmentations of the bundle's own training
    augmentation: Augmentation = field(default_factory=lambda: Augmentation(scale=(0.75, 1.33)))
    # planned steps: this many per annotated training nucleus, within the bounds (docs/finetune.md: 1 a nucleus
    # gained more on the other fields of 4 held-out groups than 0.25, in 2-4 minutes of an idle 2-core CPU)
    steps_per_nucleus: float = 1.0
    min_steps: int = 200
    max_steps: int = 2000
    scorings: int = 6                 # held-out scorings over the run, besides the start's
    patience: int = 4                 # stop after this many scorings without a better one
    heldout_share: float = 0.25       # of the images (or of each image's area) held out when there is no --val
    batch_size: int = 2
    crop: int = 256

    def steps_for(self, n_nuclei: int) -> int:
        return int(min(self.max_steps, max(self.min_steps, round(self.steps_per_nucleus * n_nuclei))))

    def describe(self) -> dict:
        return {"lr": self.lr, "backbone_lr_scale": self.backbone_lr_scale, "warmup": self.warmup,
                "augmentation": self.augmentation.describe(), "steps_per_nucleus": self.steps_per_nucleus,
                "scorings": self.scorings, "patience": self.patience, "batch_size": self.batch_size,
                "crop_px": self.crop}


@dataclass
class HeldOut:
    """The images a fine-tune is judged on: a COCO file (its images beside it) and how they were chosen."""

    annotations: Path
    description: str


@dataclass
class TrainingScale:
    """How the user's images are resampled for training (planning.Scale: network px per image px, and why), and what
    `cellseg count` is told to count them at exactly that scale."""

    factor: float
    source: str
    method: str                   # what decided it, as a count's scale says: "pixel size", "measured", "native"
    model_diameter_px: float      # the bundle's nucleus size (its [scale]), which the fine-tuned bundle keeps
    mpp_option: float | None = None   # the --mpp the user gave

    @property
    def count_diameter(self) -> float | str:
        """The --diameter that makes a count resample by `factor` (planning.choose_scale), or "native"."""
        return "native" if self.factor == 1.0 else self.model_diameter_px / self.factor

    def count_options(self) -> str:
        """What to add to `cellseg count` for this scale: --mpp whenever it was given on the command line (the
        count must see the pixel size the training saw; a protocol that needs one refuses these images without it);
        --diameter when the annotated nuclei decided it (a count would measure them itself, with the network, and
        may land nearby); nothing more when the pixel size decided it or nothing was resampled."""
        options = [f"--mpp {self.mpp_option:g}"] if self.mpp_option else []
        if self.method != "pixel size" and self.factor != 1.0:
            options.append(f"--diameter {self.count_diameter:.1f}")
        return " ".join(options)


def training_scale(bundle, items: list[TrainImage], protocol, mpp: float | None = None) -> TrainingScale:
    """The scale `cellseg count` would choose for these images (planning.decide_scale, its default), with their
    annotated nuclei as the measurement: the pixel size (`mpp`, --mpp, else the images' own when they all share one)
    with the bundle's scale in µm for the protocol's modality (or the protocol's nucleus_diameter_um), when the
    annotated nuclei do not contradict it; else their median diameter, native from 1/1.2 to 1.1 times the bundle's
    size.
    The bundle's own scale is kept: its weights learnt their nuclei at that size."""
    import dataclasses

    from ..planning import decide_scale
    from ..slides import open_slide
    sizes = [2 * np.sqrt(m.sum() / np.pi) for it in items for m in it.masks]
    measured = (float(np.median(sizes)), len(sizes)) if len(sizes) >= 10 else None
    with open_slide(Path(items[0].source)) as slide:
        info = slide.info
    if mpp is not None:
        info = dataclasses.replace(info, mpp=float(mpp), mpp_source="override")
    else:
        pixel_sizes = set()
        for it in items[1:]:
            with open_slide(Path(it.source)) as slide:
                pixel_sizes.add((slide.info.mpp, slide.info.mpp_source))
        if pixel_sizes - {(info.mpp, info.mpp_source)}:   # images of several pixel sizes: their nuclei decide
            info = dataclasses.replace(info, mpp=None, mpp_source="none: the images' pixel sizes differ")
    model_d = bundle.nucleus_diameter_px
    # The annotated sizes are exact at the images' own scale: nothing to measure again resampled (a count's network
    # reads nuclei far from its size biased; annotations are not), so only measure(1.0) answers.
    scale = decide_scale(model_d, bundle.micron_scale(protocol.modality), protocol, info,
                         lambda factor: measured if factor == 1.0 else None)
    if scale.warning:
        log.warning("%s (here: the annotated nuclei)", scale.warning.split(". Check")[0])
    source = scale.source.replace("nuclei of the busiest tiles", "annotated nuclei")
    return TrainingScale(float(scale.factor), source, scale.method or "native", model_d, mpp)


def split_heldout(items: list[TrainImage], share: float) -> tuple[list[TrainImage], list[tuple], str]:
    """Hold out part of the user's images: with WHOLE_IMAGES_FROM images or more, every k-th whole image (about
    `share` of them); with fewer, a band of `share` of each image's area at its end (along its longer side), so every
    image is both trained on and judged on. Returns the training parts, the held-out parts (name, native pixels,
    TrainImage of them) for write_heldout, and how they were chosen."""
    from .data import read_image
    train, held = [], []
    if len(items) >= WHOLE_IMAGES_FROM:
        every = max(2, round(1 / share))
        for k, item in enumerate(items):
            if k % every == every // 2:
                held.append((_held_name(k, item), read_image(Path(item.source), item.window), item))
            else:
                train.append(item)
        return train, held, f"{len(held)} of the {len(items)} images, whole (every {every}th)"
    for k, item in enumerate(items):
        _, h, w = item.image.shape
        pixels = read_image(Path(item.source), item.window)
        if w >= h:
            cut = w - max(1, round(w * share))
            train.append(window_of(item, 0, 0, h, cut))
            held.append((_held_name(k, item), pixels[:, cut:], window_of(item, 0, cut, h, w)))
        else:
            cut = h - max(1, round(h * share))
            train.append(window_of(item, 0, 0, cut, w))
            held.append((_held_name(k, item), pixels[cut:], window_of(item, cut, 0, h, w)))
    return train, held, (f"the last {round(share * 100)} % of each of the {len(items)} images (a band along its "
                         f"longer side); the rest trained on")


def _held_name(k: int, item: TrainImage) -> str:
    return f"{k:04d}_{Path(item.source or 'image').stem}"


def write_heldout(held: list[tuple[str, np.ndarray, TrainImage]], folder: Path) -> Path:
    """Each held-out image as images/NAME.tif (its native pixels) and its nuclei as COCO RLEs in annotations.json
    (the COCO file's path is returned)."""
    from ..evaluation.label_pairs import write_annotated_images
    return write_annotated_images([(name, pixels, item.boxes, item.masks) for name, pixels, item in held], folder)


class HeldOutScorer:
    """Counts the held-out images with a bundle as `cellseg count` would (its protocol's modality, channel and
    scale; the bundle's mask threshold), keeping every cell down to the validation floor, and scores them."""

    def __init__(self, heldout: HeldOut, protocol, threshold_key: str, scale: TrainingScale,
                 mpp: float | None, device: str):
        from ..evaluation import VALIDATION_PROTOCOL, annotated_images
        self.heldout, self.threshold_key, self.scale, self.mpp, self.device = (heldout, threshold_key, scale, mpp,
                                                                               device)
        # the user's protocol's name too: a count's warnings name the protocol it counted with
        self.protocol = VALIDATION_PROTOCOL.replace(name=protocol.name, modality=protocol.modality,
                                                    channel=protocol.channel,
                                                    nucleus_diameter_um=protocol.nucleus_diameter_um)
        self.mask_threshold = protocol.mask_threshold
        self.gt, self.paths = annotated_images(heldout.annotations)

    def predictions(self, bundle_dir: Path) -> dict:
        from ..bundles import load_bundle
        from ..evaluation import predict, validation_detector
        bundle = load_bundle(bundle_dir)
        detector = validation_detector(bundle, self.device, mask_threshold=self.mask_threshold,
                                       modality=self.protocol.modality)
        with tempfile.TemporaryDirectory(prefix=".count-", dir=self.heldout.annotations.parent) as work:
            return predict(detector, self.paths, Path(work), bundle.nucleus_diameter_px, self.scale.count_diameter,
                           protocol=self.protocol, mpp=self.mpp)

    def figures(self, predictions: dict, threshold: float) -> dict:
        """The card's figures (evaluation.card_figures) of the cells scoring >= threshold."""
        from ..evaluation import above, card_figures, evaluate
        report = evaluate({name: above(cells, threshold) for name, cells in predictions.items()}, self.gt)
        pooled = report.pooled
        return {"score_threshold": round(float(threshold), 4), **card_figures(report),
                "tp_fp_fn": int(pooled["tp"] + pooled["fp"] + pooled["fn"])}

    def best(self, predictions: dict, fallback: float) -> dict:
        """The figures at the score threshold with the best pooled F1 on these images (evaluation.score)."""
        from ..evaluation import score
        return self.figures(predictions, score(predictions, self.gt, fallback).threshold)

    @property
    def nuclei(self) -> int:
        return int(sum(int((~m.iscrowd).sum()) for m in self.gt.values()))


def annotated_nuclei(annotations: Path) -> int:
    """The annotated nuclei (not crowd regions) in a COCO file, without reading its images, or in a folder of
    label pairs."""
    from ..evaluation.label_pairs import annotated_fields, is_label_folder
    if is_label_folder(annotations):
        return sum(field.count() for field in annotated_fields(annotations))
    try:
        coco = json.loads(Path(annotations).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CellsegError(f"expected a COCO annotation file at {annotations}, found one that cannot be read "
                           f"({e})") from e
    return sum(1 for a in coco.get("annotations", []) if not a.get("iscrowd", 0))


@dataclass
class Verdict:
    """The outcome of a fine-tune on its held-out images."""

    table: list[dict]            # rows: {"model", "score_threshold", figures...}
    chosen_step: int
    threshold: float             # the retuned score threshold of the user's modality
    better: bool                 # the fine-tune's AP50 beats the start bundle's by more than the noise margin, both
    #                              at thresholds retuned on the held-out images
    scorings: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    gain: float = 0.0            # held-out AP50, fine-tuned - start
    margin: float = 0.0          # noise_margin: what the gain must exceed

    def lines(self) -> list[str]:
        head = ["model", "threshold", "AP50", "F1", "median count error", "DSB2018 score", "COCO mask AP"]
        rows = [[r["model"], f"{r['score_threshold']:.2f}", _f(r["ap50_tp_fp_fn_pooled"]), _f(r["f1_pooled"]),
                 _pct(r["median_rel_count_error"]), _f(r["dsb_score_mean_over_images"]), _f(r["coco_mask_ap"])]
                for r in self.table]
        widths = [max(len(head[k]), *(len(r[k]) for r in rows)) for k in range(len(head))]
        fmt = "  ".join(f"{{:{'<' if k == 0 else '>'}{w}}}" for k, w in enumerate(widths))
        return [fmt.format(*head)] + [fmt.format(*r) for r in rows]


def finetune_settings(recipe: Recipe, n_nuclei: int, steps: int | None, minutes: float | None, lr: float | None,
                      batch_size: int | None = None, crop: int | None = None, seed: int = 0):
    """TrainSettings of a fine-tune by `recipe` (steps scaled to the annotated nuclei unless given); with a time
    budget the schedule fits in it and the held-out scorings are spread over it."""
    from .maskrcnn import TrainSettings
    planned = steps if steps is not None else recipe.steps_for(n_nuclei)
    return TrainSettings(steps=planned, lr=lr if lr is not None else recipe.lr, warmup=min(recipe.warmup, planned),
                         minutes=minutes, schedule_minutes=minutes, checkpoint_every=max(planned, 50),
                         checkpoint_minutes=5.0, snapshot_every=max(1, math.ceil(planned / recipe.scorings)),
                         snapshot_minutes=minutes / recipe.scorings if minutes else None,
                         batch_size=batch_size or recipe.batch_size, crop=crop or recipe.crop, seed=seed,
                         augmentation=recipe.augmentation, backbone_lr_scale=recipe.backbone_lr_scale)


def finetune(items: list[TrainImage], classes: list[str], out: Path, start: str, protocol, *,
             val: Path | None = None, mpp: float | None = None, recipe: Recipe = Recipe(),
             steps: int | None = None, minutes: float | None = None, lr: float | None = None,
             batch_size: int | None = None, crop: int | None = None, device: str = "cpu", resume: bool = False,
             progress: bool = True, seed: int = 0) -> Verdict:
    """Fine-tune the bundle `start` on `items` (the user's annotated images at their own scale) into `out` and
    judge it on held-out images (`val`, or split off the items); see the module docstring. Returns the Verdict; the
    bundle in `out` is the best snapshot, whatever the verdict, with the verdict in its card."""
    from ..bundles import GRAY_SUFFIX, load_bundle, update_bundle_metadata
    from ..evaluation.label_pairs import has_fields, write_fields
    from ..planning import gray_input
    from .checkpoint import check_output_folder
    from .maskrcnn import train
    check_output_folder(out, resume)
    bundle = load_bundle(start)
    if not items:
        raise CellsegError("expected at least one annotated image to fine-tune on, found none")
    fields = val is not None and has_fields(Path(val))
    if val is not None:
        if annotated_nuclei(Path(val)) == 0:
            raise CellsegError(f"expected annotated nuclei in the --val images ({val}) to judge the fine-tune on, "
                               f"found none")
        # fields of slides are judged as the windows they are: written as images into OUT/heldout/ below
        heldout = HeldOut(out / HELDOUT_DIR / "annotations.json" if fields else Path(val),
                          f"the fields of --val ({val})" if fields else f"the --val images ({val})")
        train_items, held = items, None
    else:
        train_items, held, description = split_heldout(items, recipe.heldout_share)
        heldout = HeldOut(out / HELDOUT_DIR / "annotations.json", description)
        if not any(len(item.masks) for _, _, item in held):     # checked before anything is written
            raise CellsegError(f"expected annotated nuclei in the held-out part ({description}) to judge the "
                               f"fine-tune on, found none; annotate nuclei there too, or give --val annotated images")
    scale = training_scale(bundle, items, protocol, mpp)    # all annotated nuclei, uncut by the held-out band
    out.mkdir(parents=True, exist_ok=True)
    if not (resume and heldout.annotations.is_file()):   # a resumed run keeps its judges
        if held is not None:
            write_heldout(held, out / HELDOUT_DIR)
        elif fields:
            write_fields(Path(val), out / HELDOUT_DIR)
    gray = all(gray_input(it.image) for it in items)
    key = f"{protocol.modality}{GRAY_SUFFIX}" if gray else protocol.modality
    before_threshold = bundle.threshold_for(protocol.modality, gray=gray)
    resampled = [resample(it, scale.factor) for it in train_items]
    n_nuclei = sum(len(it.masks) for it in resampled)
    if n_nuclei == 0:
        raise CellsegError("expected annotated nuclei outside the held-out images, found none")
    settings = finetune_settings(recipe, n_nuclei, steps, minutes, lr, batch_size, crop, seed)
    scorer = HeldOutScorer(heldout, protocol, key, scale, mpp, device)
    log.info("fine-tuning %s on %d nuclei (resampled x%.3f: %s); held out: %s (%d nuclei)", bundle.name, n_nuclei,
             scale.factor, scale.source, heldout.description, scorer.nuclei)
    record = _read_scores(out) if resume else {"heldout": heldout.description, "scorings": []}
    stopped: list[int] = []

    def on_snapshot(folder: Path, step: int) -> bool:
        predictions = scorer.predictions(folder)
        figures = scorer.best(predictions, before_threshold)
        if step == 0:
            record["start_own_threshold"] = scorer.figures(predictions, before_threshold)
        record["scorings"] = [s for s in record["scorings"] if s["step"] != step] + [{"step": step, **figures}]
        _write_scores(out, record)
        log.info("step %d: held-out AP50 %.3f at threshold %.2f", step, figures["ap50_tp_fp_fn_pooled"] or 0,
                 figures["score_threshold"])
        tuned = [s for s in record["scorings"] if s["step"] > 0]
        best = _best(tuned)["step"] if tuned else None
        for s in record["scorings"]:     # only the best fine-tuned snapshot is kept (step 0 is the start bundle)
            folder_k = out / "snapshots" / f"step{s['step']:07d}"
            if s["step"] != best and folder_k.is_dir():
                shutil.rmtree(folder_k, ignore_errors=True)
        # early stopping: `patience` scorings without a better one, with planned steps still to run (the last
        # scoring ends the run anyway)
        if step < settings.steps and best is not None and sum(s["step"] > best for s in tuned) >= recipe.patience:
            stopped.append(step)
            return True
        return False

    card = {"finetune": {"start": f"{bundle.name} ({bundle.weights_sha256[:12]})", "heldout": heldout.description,
                         "heldout_nuclei": scorer.nuclei, "training_nuclei": n_nuclei,
                         "scale": {"factor": round(scale.factor, 4), "method": scale.method,
                                   "source": scale.source, "count_options": scale.count_options()},
                         "threshold_key": key, "recipe": recipe.describe()}}
    train(resampled, classes, out, settings, device=device, card=card, progress=progress, init=start,
          resume=resume, on_snapshot=on_snapshot, keep_settings_of=bundle.path, folder_checked=True)
    record = _read_scores(out)
    steps_run = _steps_run(out)
    if steps_run not in {s["step"] for s in record["scorings"]}:   # the last weights, unless just scored
        predictions = scorer.predictions(out)
        record["scorings"].append({"step": steps_run, **scorer.best(predictions, before_threshold)})
        _write_scores(out, record)
    start_row = next(s for s in record["scorings"] if s["step"] == 0)
    tuned = _best([s for s in record["scorings"] if s["step"] > 0] or [start_row])
    if tuned["step"] != steps_run and tuned["step"] > 0:
        _take_snapshot_weights(out, out / "snapshots" / f"step{tuned['step']:07d}")
    shutil.rmtree(out / "snapshots", ignore_errors=True)
    gain = (tuned["ap50_tp_fp_fn_pooled"] or 0) - (start_row["ap50_tp_fp_fn_pooled"] or 0)
    margin = noise_margin(start_row)
    better = tuned["step"] > 0 and gain > margin
    table = [{"model": f"{bundle.name} (start), its threshold", **record["start_own_threshold"]},
             {"model": f"{bundle.name} (start), threshold retuned", **_figures_only(start_row)},
             {"model": f"fine-tuned (step {tuned['step']})", **_figures_only(tuned)}]
    verdict = Verdict(table, int(tuned["step"]), float(tuned["score_threshold"]), better, record["scorings"],
                      stopped_early=bool(stopped), gain=gain, margin=margin)
    thresholds = {**bundle.score_thresholds, key: verdict.threshold}
    card["finetune"].update(
        chosen_step=verdict.chosen_step, steps_run=steps_run, planned_steps=settings.steps,
        stopped_early=verdict.stopped_early,
        verdict=("better than the start bundle on the held-out images" if better else
                 "NOT better than the start bundle on the held-out images: use the start bundle"),
        better=better, ap50_gain=round(gain, 4), noise_margin=round(margin, 4), table=verdict.table,
        scorings=[{"step": s["step"], "ap50": s["ap50_tp_fp_fn_pooled"], "threshold": s["score_threshold"]}
                  for s in record["scorings"]],
        note="the held-out images chose the snapshot and the score threshold and are reported on: optimistic for "
             "the fine-tune; count other images to know")
    update_bundle_metadata(out, score_thresholds=thresholds, card=card)
    return verdict


def noise_margin(start: dict) -> float:
    """How much the held-out AP50 of the start bundle could move by chance: one binomial standard error,
    sqrt(p (1 - p) / n), p its AP50 = TP / (TP + FP + FN), n = TP + FP + FN on the held-out images. A fine-tune must
    gain more than this to count as better: a gain within it (a few nuclei of a small held-out part) was measured to
    come with a loss on other fields of the same patient (docs/finetune.md)."""
    p, n = start.get("ap50_tp_fp_fn_pooled") or 0.0, start.get("tp_fp_fn") or 0
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def _figures_only(scoring: dict) -> dict:
    return {k: v for k, v in scoring.items() if k != "step"}


def _best(scorings: list[dict]) -> dict:
    """The scoring with the highest held-out AP50 (the earliest of equals)."""
    return max(sorted(scorings, key=lambda s: s["step"]), key=lambda s: s["ap50_tp_fp_fn_pooled"] or 0.0)


def _take_snapshot_weights(out: Path, snapshot: Path) -> None:
    """OUT's bundle gets the weights of its snapshot (the card stays the run's, with the snapshot's step)."""
    from ..bundles import BUNDLE_FORMAT, read_bundle_folder, write_toml
    meta, _ = read_bundle_folder(out, BUNDLE_FORMAT)
    snap, digest = read_bundle_folder(snapshot, BUNDLE_FORMAT)
    shutil.copyfile(snapshot / "weights.safetensors", out / "weights.safetensors")
    meta["weights_sha256"] = digest
    meta["training"] = {**meta.get("training", {}), "steps": snap.get("training", {}).get("steps")}
    write_toml(out / "model.toml", meta)


def _read_scores(out: Path) -> dict:
    path = out / SCORES_FILE
    if not path.is_file():
        return {"heldout": "", "scorings": []}
    return json.loads(path.read_text(encoding="utf-8"))


def _write_scores(out: Path, record: dict) -> None:
    (out / SCORES_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")


def _steps_run(out: Path) -> int:
    from ..bundles import load_bundle
    return int(load_bundle(out).card.get("training", {}).get("steps", 0))


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"

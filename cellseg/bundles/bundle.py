"""Model bundles: a folder with model.toml (architecture, classes, scale, thresholds, card) + safetensors weights.

Weights are stored as float16 safetensors (half the size, never unpickled) and loaded as float32.
The default bundle ships inside the package under cellseg/models/. The tissue U-Net's bundles (tissue_unet) are
the same kind of folder in another format: both are found by `find_bundle` and checked by `read_bundle_folder`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import tomli_w
import tomllib

from ..errors import BundleError
from .calibration import NO_CALIBRATION, BundleCalibration

BUNDLE_FORMAT = "cellseg-bundle/1"
DEFAULT_BUNDLE = "nuclei"
_WEIGHTS = "weights.safetensors"
GRAY_SUFFIX = "_gray"      # [inference.score_threshold_by_modality] brightfield_gray: for gray network input


@dataclass(frozen=True)
class BundleKind:
    """One kind of bundle: what messages call it, the format its model.toml declares, the shipped bundle used when
    none is named, and how a user makes one (said when a name is unknown)."""

    noun: str            # "model", "tissue": "expected a tissue bundle folder ..."
    format: str          # model.toml's `format`
    default_name: str    # a folder under cellseg/models/
    how_to_make: str


MODEL_BUNDLE = BundleKind("model", BUNDLE_FORMAT, DEFAULT_BUNDLE, "train one with `cellseg train` and pass --model PATH")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a cell Mask R-CNN (network.build_model builds it); a bundle's model.toml [model] table."""

    backbone: str = "resnet18"          # resnet18 | resnet34 | resnet50
    norm: str = "groupnorm"             # groupnorm (trains from scratch with small batches) | frozen_bn (COCO init)
    fpn_channels: int = 128
    box_head_size: int = 512
    classes: tuple[str, ...] = ("nucleus",)   # foreground classes; class id k >= 1 is classes[k-1]
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    detections_per_tile: int = 3000
    rpn_pre_nms_top_n_test: int = 6000
    rpn_post_nms_top_n_test: int = 3000
    rpn_pre_nms_top_n_train: int = 4000
    rpn_post_nms_top_n_train: int = 2000
    box_batch_size_per_image: int = 256
    box_nms_thresh: float = 0.4
    roi_sampling_ratio: int = 2         # RoIAlign samples per bin side (torchvision's 2); 1: a quarter of the reads

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model keys {sorted(unknown)}; expected some of {sorted(known)}")
        tupled = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**tupled)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class MicronScale:
    """A bundle's scale in µm for one imaging modality: the pixel size its training images of that modality had
    (`mpp`, µm per px) and their nuclei's median equivalent diameter there (px). A slide of the modality whose
    pixel size is known is resampled to `mpp` (planning.plan_slide): its nuclei then reach the network at the size
    they had in training, whatever the scanner's magnification. Only for training data with a known pixel size."""

    mpp: float
    nucleus_diameter_px: float
    source: str = ""        # which images, which pixel size and where it comes from (for people)

    @property
    def nucleus_diameter_um(self) -> float:
        return self.nucleus_diameter_px * self.mpp

    def to_dict(self) -> dict:
        """model.toml's [scale.<modality>] table (nucleus_diameter_um written too, for people)."""
        return {"mpp": float(self.mpp), "nucleus_diameter_px": float(self.nucleus_diameter_px),
                "nucleus_diameter_um": round(self.nucleus_diameter_um, 4), "source": self.source}


@dataclass(frozen=True)
class Bundle:
    """A loadable model: its folder, its architecture and what the card says about it."""

    path: Path
    name: str
    model: ModelConfig
    score_threshold: float
    mask_threshold: float
    nucleus_diameter_px: float          # typical nucleus diameter at the scale the model was trained on
    weights_sha256: str
    card: dict = field(default_factory=dict)   # [training], [metrics], ... free-form, for people
    proposal_threshold: float = 0.0     # RPN objectness floor at inference (speed; 0 keeps every proposal)
    # Score threshold tuned per imaging modality (a protocol's `modality`: fluorescence | brightfield) on held-out
    # images of that modality, and per modality + GRAY_SUFFIX ("brightfield_gray") for a slide whose network input
    # has no colour (detection.detector.gray_input): grayscale smears and colour tissue are both brightfield, but
    # their false positives differ; score_threshold is the fallback for a modality the bundle was not tuned on.
    score_thresholds: dict[str, float] = field(default_factory=dict)
    # The same, tuned with test-time augmentation (cellseg.detection.tta: merged scores of 8 views are another scale).
    tta_score_thresholds: dict[str, float] = field(default_factory=dict)
    # Mask probability threshold per protocol modality (fluorescence | brightfield), chosen on held-out images:
    # fluorescence nuclei have sharp edges the network's soft masks overshoot, H&E ones soft edges;
    # mask_threshold is the fallback for a modality without one.
    mask_thresholds: dict[str, float] = field(default_factory=dict)
    # [calibration] (bundles.calibration): p_nucleus and the count's interval, fitted on held-out images for these
    # weights; None without one, or when it was fitted for other weights (calibration_note says which)
    calibration: BundleCalibration | None = None
    calibration_note: str = NO_CALIBRATION
    # [scale.<modality>]: the scale in µm of the modalities whose training images had a pixel size (MicronScale);
    # none in a bundle made before it existed, or for a modality whose training data had no pixel size
    micron_scales: dict[str, MicronScale] = field(default_factory=dict)

    def micron_scale(self, modality: str | None) -> MicronScale | None:
        """The scale in µm of `modality` (a protocol's: fluorescence | brightfield), or None when the bundle has none."""
        return self.micron_scales.get(str(modality))

    def threshold_for(self, modality: str | None, tta: bool = False, gray: bool = False) -> float:
        """The score threshold tuned for `modality` (with TTA when `tta` and the bundle has one; for a gray network
        input when `gray` and the bundle has one), else the one for `modality`, else the bundle's default."""
        tables = [self.tta_score_thresholds, self.score_thresholds] if tta else [self.score_thresholds]
        keys = [f"{modality}{GRAY_SUFFIX}", modality] if gray else [modality]
        for table in tables:        # a gray threshold without TTA is no stand-in for a TTA one
            for key in keys:
                if key in table:
                    return float(table[key])
        return float(self.score_threshold)

    def mask_threshold_for(self, modality: str | None) -> float:
        """The mask probability threshold chosen for `modality` (a protocol's), else the bundle's default."""
        return float(self.mask_thresholds.get(str(modality), self.mask_threshold))

    def training_stages(self) -> list[dict]:
        """Every training stage that made this bundle, oldest first, its own last: the `earlier_stages` of a
        bundle made from this one (a fine-tune or an interpolation)."""
        stages = list(self.card.get("earlier_stages")
                      or ([self.card["base_training"]] if "base_training" in self.card else []))
        stages.append({"bundle": self.name, "weights_sha256": self.weights_sha256, **self.card.get("training", {})})
        return stages

    @property
    def weights_path(self) -> Path:
        return self.path / _WEIGHTS

    def state_dict(self) -> dict:
        return read_weights(self.weights_path)


def packaged_bundles_root() -> Path:
    return Path(str(resources.files("cellseg") / "models"))


def shipped_bundle_names(kind: BundleKind = MODEL_BUNDLE) -> list[str]:
    """Names of the bundles of `kind` shipped in the package (cell models by default: not the tissue U-Net's)."""
    root = packaged_bundles_root()
    names = []
    for toml_path in sorted(root.glob("*/model.toml")) if root.is_dir() else []:
        try:
            if tomllib.loads(toml_path.read_text(encoding="utf-8")).get("format") == kind.format:
                names.append(toml_path.parent.name)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
    return names


def find_bundle(name_or_path: str | os.PathLike | None, kind: BundleKind = MODEL_BUNDLE) -> Path:
    """A bundle folder from a path (the folder or its model.toml), or the name of a bundle of `kind` shipped in the
    package (None -> kind's default). A path is returned as given: read_bundle_folder says what is wrong with it."""
    name = kind.default_name if name_or_path is None else str(name_or_path)
    candidate = Path(name)
    # "/" as well as os.sep: a path written the POSIX way is a path on Windows too, never a shipped name
    if candidate.is_dir() or os.sep in name or "/" in name or name.endswith(".toml"):
        return candidate.parent if candidate.name == "model.toml" else candidate
    shipped = packaged_bundles_root() / name
    if not (shipped / "model.toml").is_file():
        have = shipped_bundle_names(kind)
        hint = (f"shipped bundles: {', '.join(have)}" if have
                else f"this installation ships no trained {kind.noun} bundle")
        raise BundleError(f"expected a {kind.noun} bundle folder or a shipped bundle name, got {name!r} ({hint}; "
                          f"{kind.how_to_make})")
    return shipped


def read_bundle_folder(folder: Path, fmt: str, noun: str = "model", require_sha256: bool = False) -> tuple[dict, str]:
    """Check a bundle folder (model.toml is TOML of format `fmt`, weights present and matching the recorded
    sha256) and return (model.toml as a dict, the weights' sha256). Every failure is a one-line BundleError that
    calls the bundle a `noun` bundle (BundleKind.noun)."""
    if not folder.is_dir():
        raise BundleError(f"expected a {noun} bundle folder, found no bundle at {folder} (no such folder)")
    toml_path = folder / "model.toml"
    if not toml_path.is_file():
        raise BundleError(f"expected a {noun} bundle folder with model.toml, found no {toml_path}")
    try:
        meta = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"expected valid TOML in {toml_path}, found a file that is not valid TOML: {e}") from e
    if meta.get("format") != fmt:
        raise BundleError(f"expected format = {fmt!r} in {toml_path}, found {meta.get('format')!r}")
    weights = folder / _WEIGHTS
    if not weights.is_file():
        raise BundleError(f"expected weights at {weights}, found none (the bundle is incomplete)")
    digest = sha256_file(weights)
    recorded = meta.get("weights_sha256")
    if recorded is None and require_sha256:
        raise BundleError(f"expected weights_sha256 in {toml_path}, found none")
    if recorded not in (None, digest):
        raise BundleError(f"{weights} does not match the sha256 recorded in model.toml "
                          f"(expected {str(recorded)[:12]}…, found {digest[:12]}…): the file is corrupt or replaced")
    return meta, digest


def load_bundle(name_or_path: str | os.PathLike | None = None) -> Bundle:
    folder = find_bundle(name_or_path)
    meta, digest = read_bundle_folder(folder, BUNDLE_FORMAT)
    toml_path = folder / "model.toml"
    try:
        model = ModelConfig.from_dict(meta.get("model", {}))
        inference = meta.get("inference", {})
        return Bundle(
            path=folder, name=str(meta.get("name", folder.name)), model=model,
            score_threshold=float(inference.get("score_threshold", 0.5)),
            mask_threshold=float(inference.get("mask_threshold", 0.5)),
            proposal_threshold=float(inference.get("proposal_threshold", 0.0)),
            score_thresholds=_thresholds(inference.get("score_threshold_by_modality", {}), toml_path,
                                         "score_threshold_by_modality"),
            tta_score_thresholds=_thresholds(inference.get("tta_score_threshold_by_modality", {}), toml_path,
                                             "tta_score_threshold_by_modality"),
            mask_thresholds=_thresholds(inference.get("mask_threshold_by_modality", {}), toml_path,
                                        "mask_threshold_by_modality", what="a mask probability threshold"),
            nucleus_diameter_px=float(meta.get("scale", {}).get("nucleus_diameter_px", 0.0)),
            micron_scales=_micron_scales(meta.get("scale", {}), toml_path),
            weights_sha256=digest,
            card={k: v for k, v in meta.items() if k not in ("model", "inference", "scale", "format", "calibration")},
            **_calibration(meta.get("calibration"), digest, toml_path),
        )
    except (TypeError, ValueError, AttributeError) as e:  # AttributeError: a table given as a plain value
        raise BundleError(f"invalid model.toml at {toml_path}: {e}") from e


def _micron_scales(scale, toml_path: Path) -> dict[str, MicronScale]:
    """[scale.<modality>] tables: modality -> MicronScale (a bundle without them has no scale in µm)."""
    if not isinstance(scale, dict):
        raise BundleError(f"expected [scale] in {toml_path} to be a table, found {type(scale).__name__}")
    out = {}
    for modality, table in scale.items():
        if not isinstance(table, dict):
            continue                        # nucleus_diameter_px, the size in px of all training data
        mpp, px = table.get("mpp"), table.get("nucleus_diameter_px")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (mpp, px)):
            raise BundleError(f"expected [scale.{modality}] in {toml_path} to give mpp (µm per px) and "
                              f"nucleus_diameter_px, both > 0, found mpp = {mpp!r}, nucleus_diameter_px = {px!r}")
        out[str(modality)] = MicronScale(float(mpp), float(px), str(table.get("source", "")))
    return out


def _calibration(table, digest: str, toml_path: Path) -> dict:
    """Bundle's calibration and calibration_note from model.toml's [calibration] (checked: BundleError)."""
    if table is None:
        return {"calibration": None, "calibration_note": NO_CALIBRATION}
    calibration = BundleCalibration.from_dict(table, str(toml_path))
    if calibration.weights_sha256 != digest:
        return {"calibration": None,
                "calibration_note": f"{NO_CALIBRATION} for these weights (its calibration was fitted for "
                                    f"{calibration.weights_sha256[:12]}…, these are {digest[:12]}…: refit it)"}
    return {"calibration": calibration, "calibration_note": f"calibrated on held-out images ({calibration.method})"}


def _thresholds(table, toml_path: Path, key: str, what: str = "a score threshold") -> dict[str, float]:
    """[inference.<key>]: modality -> threshold in [0, 1]."""
    if not isinstance(table, dict):
        raise BundleError(f"expected [inference.{key}] in {toml_path} to be a table of modality = threshold, "
                          f"found {type(table).__name__}")
    out = {}
    for modality, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise BundleError(f"expected {what} between 0 and 1 for {modality!r} in [inference.{key}] "
                              f"of {toml_path}, found {value!r}")
        out[str(modality)] = float(value)
    return out


def save_bundle(folder: Path, model: ModelConfig, state_dict: dict, *, name: str,
                score_threshold: float = 0.5, mask_threshold: float = 0.5,
                nucleus_diameter_px: float = 0.0, card: dict | None = None,
                proposal_threshold: float = 0.0, micron_scales: dict[str, MicronScale] | None = None) -> Bundle:
    """Write weights (float16 safetensors) then model.toml, each atomically, and return the loaded bundle.
    micron_scales: the scale in µm per modality whose training images had a pixel size (MicronScale)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(folder / _WEIGHTS, state_dict)
    meta = {"format": BUNDLE_FORMAT, "name": name, "weights_sha256": sha256_file(folder / _WEIGHTS),
            "model": model.to_dict(),
            "inference": {"score_threshold": float(score_threshold), "mask_threshold": float(mask_threshold),
                          "proposal_threshold": float(proposal_threshold)},
            "scale": {"nucleus_diameter_px": float(nucleus_diameter_px),
                      **{k: v.to_dict() for k, v in sorted((micron_scales or {}).items())}}}
    meta.update(card or {})
    write_toml(folder / "model.toml", meta)
    return load_bundle(folder)


def interpolate_bundles(start: str | os.PathLike, tuned: str | os.PathLike, alpha: float, out: Path,
                        *, name: str, reproduce: str = "") -> Bundle:
    """A bundle whose weights are (1 - alpha) x `start`'s + alpha x `tuned`'s, for `tuned` fine-tuned from `start`
    (WiSE-FT, Wortsman et al., CVPR 2022): a fine-tune that gains on new data but forgets some of what `start`
    knew keeps most of both. The card keeps every training stage of `tuned` and records the interpolation;
    thresholds and validation figures are `tuned`'s until the new bundle is validated. `out` must be new or empty."""
    if not 0.0 <= alpha <= 1.0:
        raise BundleError(f"expected an interpolation weight between 0 and 1, found {alpha}")
    a, b = load_bundle(start), load_bundle(tuned)
    return _write_weighted_mean([a, b], [1 - alpha, alpha], out, name=name, template=b,
                                training={"interpolation": {"alpha": float(alpha), "start": a.name,
                                                            "start_sha256": a.weights_sha256, "tuned": b.name,
                                                            "tuned_sha256": b.weights_sha256},
                                          "reproduce": reproduce})


def average_bundles(bundles: list[str | os.PathLike], out: Path, *, name: str, reproduce: str = "") -> Bundle:
    """A bundle whose weights are the mean of `bundles`' (a uniform model soup, Wortsman et al., ICML 2022): fine-tunes
    of one start, each left by its last steps somewhere noisy, average to weights in a flatter region that keep what
    each of them lost. The card records each ingredient (name, sha256, its training) and keeps the first one's earlier
    stages; its thresholds, scale and split are the first bundle's until the new bundle is validated. `out` must be
    new or empty."""
    if len(bundles) < 2:
        raise BundleError(f"expected at least two bundles to average, found {len(bundles)}")
    loaded = [load_bundle(b) for b in bundles]
    ingredients = [{"bundle": b.name, "sha256": b.weights_sha256, **({"training": b.card["training"]}
                                                                      if "training" in b.card else {})}
                   for b in loaded]
    return _write_weighted_mean(loaded, [1 / len(loaded)] * len(loaded), out, name=name, template=loaded[0],
                                training={"soup": ingredients, "reproduce": reproduce})


def _write_weighted_mean(bundles: list[Bundle], weights: list[float], out: Path, *, name: str, template: Bundle,
                         training: dict) -> Bundle:
    """Write sum(weights[k] x bundles[k]'s float tensors) (other tensors: the template's) into the new or empty
    folder `out`, with the template's model.toml and split.json, `training` as the card's training table and the
    template's training stages as its earlier ones."""
    first = bundles[0]
    for other in bundles[1:]:
        if other.model != first.model:
            raise BundleError(f"expected bundles of one architecture, found {first.path} and {other.path} differing "
                              f"in [model]")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"expected a new or empty folder for the combined bundle, found {out} "
                          f"{'holding files' if out.is_dir() else 'being a file'}")
    states = [b.state_dict() for b in bundles]
    for b, state in zip(bundles[1:], states[1:]):
        if state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state):
            raise BundleError(f"expected the same tensors in {first.weights_path} and {b.weights_path}, found others")
    own = states[bundles.index(template)]
    mean = {k: sum(w * state[k] for w, state in zip(weights, states)) if own[k].is_floating_point() else own[k]
            for k in own}
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out / _WEIGHTS, mean)
    meta, _ = read_bundle_folder(template.path, BUNDLE_FORMAT)
    meta.update(name=name, weights_sha256=sha256_file(out / _WEIGHTS), earlier_stages=template.training_stages(),
                training=training)
    if (template.path / "split.json").is_file():   # the hold-out split travels with the bundle (validate_bundle reads it)
        (out / "split.json").write_bytes((template.path / "split.json").read_bytes())
    write_toml(out / "model.toml", meta)
    return load_bundle(out)


def update_bundle_metadata(folder: Path, *, score_threshold: float | None = None,
                           mask_threshold: float | None = None, card: dict | None = None,
                           score_thresholds: dict[str, float] | None = None,
                           tta_score_thresholds: dict[str, float] | None = None,
                           mask_thresholds: dict[str, float] | None = None,
                           calibration: BundleCalibration | None = None) -> Bundle:
    """Set the default thresholds (score_thresholds, mask_thresholds: per modality, replacing any earlier ones; an
    empty mask_thresholds removes the table), replace whole
    card tables (e.g. [metrics]) and the [calibration] (bundles.calibration) in a bundle's model.toml, atomically;
    the weights are not touched."""
    folder = find_bundle(folder)
    meta, _ = read_bundle_folder(folder, BUNDLE_FORMAT)
    inference = dict(meta.get("inference", {}))
    if score_threshold is not None:
        inference["score_threshold"] = float(score_threshold)
    if mask_threshold is not None:
        inference["mask_threshold"] = float(mask_threshold)
    for key, table in (("score_threshold_by_modality", score_thresholds),
                       ("tta_score_threshold_by_modality", tta_score_thresholds),
                       ("mask_threshold_by_modality", mask_thresholds)):
        if table is not None:
            inference[key] = {k: float(v) for k, v in sorted(table.items())}
            if not table:
                del inference[key]
    meta["inference"] = inference
    if calibration is not None:
        meta["calibration"] = calibration.to_dict()
    for key in (card or {}):
        if key in ("format", "name", "weights_sha256", "model", "inference", "scale", "calibration"):
            raise BundleError(f"expected card tables, got the reserved model.toml key {key!r}")
    meta.update(card or {})
    write_toml(folder / "model.toml", meta)
    return load_bundle(folder)


def update_bundle_scale(folder: Path, micron_scales: dict[str, MicronScale]) -> Bundle:
    """Set a bundle's scale in µm per modality ([scale.<modality>]: MicronScale), replacing any earlier ones, in its
    model.toml, atomically; [scale] nucleus_diameter_px and the weights are not touched."""
    folder = find_bundle(folder)
    meta, _ = read_bundle_folder(folder, BUNDLE_FORMAT)
    scale = {k: v for k, v in meta.get("scale", {}).items() if not isinstance(v, dict)}
    meta["scale"] = {**scale, **{k: v.to_dict() for k, v in sorted(micron_scales.items())}}
    write_toml(folder / "model.toml", meta)
    return load_bundle(folder)


def write_weights(path: Path, state_dict: dict) -> None:
    """Save a state dict as float16 safetensors (other dtypes kept), atomically (temp file + rename)."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in state_dict.items()}
    tmp = path.parent / f".{path.name}.tmp"
    save_file(tensors, str(tmp))
    os.chmod(tmp, _file_mode())  # safetensors (like NamedTemporaryFile) creates 0600: others could not read it
    os.replace(tmp, path)


def read_weights(path: Path) -> dict:
    """A safetensors file as a state dict with float32 floating-point tensors (never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"expected safetensors weights at {path}, found an unreadable "
                          f"file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def write_toml(path: Path, meta: dict) -> None:
    """Write a TOML file atomically, readable by others (the umask decides, as for a plain open()). TOML has no
    null: a None (a figure not measured, e.g. on images without nuclei) is left out, and reads back as missing."""
    path = Path(path)
    data = tomli_w.dumps(_without_none(meta)).encode("utf-8")    # first: a bad value writes nothing
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".toml.tmp") as f:
        f.write(data)
    os.chmod(f.name, _file_mode())
    os.replace(f.name, path)


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_none(v) for v in value if v is not None]
    return value


def _file_mode() -> int:
    """0o666 minus the umask: the mode a plain open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

"""Protocols: named analysis presets stored as TOML (protocols/*.toml, installed as cellseg.protocols).

A protocol is data with a schema. Every setting is declared once, in SETTINGS, with its section of the file, its
type and allowed values, its default and what it does; from that one declaration come the file's schema (an
unknown key or a bad value is an error that names the file and the key), the fields and defaults of Protocol,
and the `cellseg count` option that overrides it (cli.py), so adding a setting is one line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from ..errors import ParameterError, ProtocolError
from ..geometry import check_halo
from ..tissue import METHODS as TISSUE_METHODS


@dataclass(frozen=True)
class Range:
    """A setting's allowed range (bounds included; None: open). Called with a value: what was expected, or None."""

    lo: float | None = None
    hi: float | None = None

    def __call__(self, v):
        lo, hi = self.lo, self.hi
        # NaN compares false with every bound, so it is refused by name (as is infinity)
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"between {lo} and {hi}" if lo is not None and hi is not None else (
                f">= {lo}" if lo is not None else f"<= {hi}" if hi is not None else "a finite number")
        return None


@dataclass(frozen=True)
class OneOf:
    """A setting's allowed values. Called with a value: what was expected, or None."""

    choices: tuple[str, ...]

    def __call__(self, v):
        return None if v in self.choices else "one of " + ", ".join(map(repr, self.choices))


@dataclass(frozen=True)
class FileList:
    """A setting naming files: "all", or some of `choices` separated by commas. Called with a value: what was
    expected, or None."""

    choices: tuple[str, ...]

    def __call__(self, v):
        names = [n.strip() for n in v.split(",")]
        if v.strip() == "all" or (all(names) and set(names) <= set(self.choices)):
            return None
        return "all, or names separated by commas out of " + ", ".join(self.choices)


# The result files `outputs` can pick (results/writer.py writes them; summary.json and run.json always).
OUTPUT_FILES = ("cells.csv", "cells.geojson", "predictions.coco.json", "labels.ome.tif", "panoptic.ome.tif",
                "cell_labels.ome.tif", "overlay.png", "tissue_mask.png", "area_histogram.png", "report.html",
                "regions.csv")

# Tiles per detector call when the protocol sets none (`batch_size`): on an H100, 16 counted a 20480² slide 1.07-1.17x
# faster than 4, the same cells (docs/performance.md); a CPU gains nothing from more than 4.
TILES_PER_PASS = {"cpu": 4, "cuda": 16}


def tiles_per_pass(device: object) -> int:
    """The batch size a count uses on `device` (torch.device or its name) when its protocol sets none."""
    return TILES_PER_PASS["cuda" if str(device).startswith("cuda") else "cpu"]


REQUIRED = dataclasses.MISSING   # the default of a setting every protocol file must give


@dataclass(frozen=True)
class Setting:
    """One protocol setting: the [section] of the file it is written in ("": the top level), its key, type
    (a float setting also takes an int, as TOML writes 5 for 5.0), allowed values, default and what it does; `flag`
    is the `cellseg count` option overriding it (None: set in protocol files only)."""

    section: str
    key: str
    kind: type
    default: Any
    help: str
    allowed: Range | OneOf | None = None
    flag: str | None = None

    @property
    def annotation(self) -> str:
        """Protocol's type annotation of this field."""
        return self.kind.__name__ + (" | None" if self.default is None else "")

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this setting ("expected ..., got ..."), or None when it is allowed."""
        accepts = (int, float) if self.kind is float else (self.kind,)
        # bool is an int in Python; an integer setting must not accept `true`.
        if not isinstance(value, accepts) or (isinstance(value, bool) and self.kind is not bool):
            return f"expected {' or '.join(k.__name__ for k in accepts)}, got {value!r}"
        expected = self.allowed(value) if self.allowed else None
        return f"expected {expected}, got {value!r}" if expected else None


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    Setting("", "name", str, REQUIRED, "The protocol's name."),
    Setting("", "description", str, "", "What it is for."),
    Setting("", "modality", str, "fluorescence", "Imaging modality.", OneOf(("fluorescence", "brightfield"))),
    Setting("input", "channel", int, None,
            "Channel holding the nuclei, 0-based (unset: one named like a nuclear stain, DAPI or Hoechst, else an "
            "RGB image as is, else channel 0).", Range(0), "--channel"),
    Setting("input", "require_mpp", bool, False, "Stop when the image has no pixel size and none is given."),
    Setting("tiling", "tile_size", int, 512, "Tile core size in px.", Range(64, 8192), "--tile-size"),
    Setting("tiling", "halo_px", int, 64,
            "Tile halo in px (context read around each tile's core), >= the largest cell diameter.",
            Range(0, 4096), "--halo"),
    Setting("tiling", "batch_size", int, None,
            "Tiles per detector call (unset: 16 on a GPU, 4 on a CPU; a GPU short of memory halves it as it "
            "goes).", Range(1, 256), "--batch-size"),
    Setting("detection", "model", str, "nuclei",
            "Model bundle: a bundle folder (in a protocol file, a relative path is from the file's folder), or the "
            "name of one shipped with cellseg.", None, "--model"),
    Setting("detection", "score_threshold", float, None,
            "Minimum detection score (unset: the bundle's, tuned for the modality).", Range(0.0, 1.0),
            "--score-threshold"),
    Setting("detection", "mask_threshold", float, None,
            "Soft-mask probability threshold (unset: the bundle's for the modality, chosen on held-out images).",
            Range(0.0, 1.0)),
    Setting("detection", "min_area_px", int, 10, "Drop cells smaller than this many px (fragments).", Range(0)),
    Setting("detection", "precision", str, "auto",
            "The network's arithmetic on a CPU: bf16 where the processor has it natively (auto), or fp32 / bf16 "
            "as given; GPUs use fp16 autocast unless fp32.", OneOf(("auto", "fp32", "bf16")), "--precision"),
    Setting("detection", "nucleus_diameter_um", float, None,
            "Typical nucleus diameter in µm: with the slide's pixel size, tiles are resampled so nuclei reach the "
            "model at its training size (unset: no resampling).", Range(0.5, 200.0)),
    Setting("detection", "network_nucleus_px", float, None,
            "The nucleus diameter in px the network sees: slides are resampled so their nuclei reach it (unset: the "
            "model's training size, its bundle's nucleus_diameter_px). Larger finds more of the small, dim and "
            "crowded nuclei of fluorescence images at more compute: held out, the v4 model at 27 px against its 20.3 "
            "counted DSB2018's fluorescence 0.855 against 0.848 AP50 and Kromp's 0.815 against 0.797, at ~1.8x the "
            "pixels (docs/training.md).", Range(4.0, 200.0), "--network-nucleus-px"),
    Setting("tissue", "tissue_method", str, "unet",
            "How background is found and skipped before detection: "
            + ", ".join(f"{name} ({what})" for name, what in TISSUE_METHODS.items()) + ".",
            OneOf(tuple(TISSUE_METHODS)), "--tissue"),
    Setting("tissue", "min_tissue_fraction", float, 0.01,
            "Skip tiles whose core is less than this share tissue.", Range(0.0, 1.0), "--min-tissue-fraction"),
    Setting("seams", "dedupe_overlap", float, 0.5,
            "Cells from neighbouring tiles overlapping more than this (intersection over the smaller) are one "
            "cell.", Range(0.0, 1.0)),
    # Cells by expansion (cells/expansion.py, cells/expansion_rows.py). QuPath's cell detection grows nuclei by 5 µm by default
    # (cellExpansionMicrons = 5.0); he-nuclei takes that default (it requires the pixel size, and pathologists
    # read the nucleus/cell area ratio and cytoplasmic stain off it).
    Setting("cells", "cell_expansion_um", float, 0.0,
            "Grow each nucleus by up to this many µm into an estimated cell, stopping where it meets a "
            "neighbour's, and measure cells and cytoplasm too (0: nuclei only). Needs the pixel size.",
            Range(0.0, 100.0), "--cell-expansion-um"),
    Setting("cells", "cell_expansion_px", float, None,
            "The same in px, for images without a pixel size (in place of the expansion in µm).",
            Range(0.0, 2000.0), "--cell-expansion-px"),
    Setting("export", "geojson_gzip_above_mb", float, 500.0,
            "cells.geojson is written gzipped (cells.geojson.gz) when larger than this many MB (0: always).",
            Range(0.0, 1e9)),
    Setting("export", "outputs", str, "all",
            "The result files to write: all, or their names separated by commas (e.g. cells.csv,cells.geojson); "
            "summary.json, run.json and below_threshold.csv are always written, and report.html brings the files "
            "it is drawn from (cells.csv, overlay.png, tissue_mask.png, labels.ome.tif).",
            FileList(OUTPUT_FILES), "--outputs"),
)}

# The file's layout: section -> key -> setting, in SETTINGS' order ("": the top level).
SCHEMA: dict[str, dict[str, Setting]] = {
    section: {s.key: s for s in SETTINGS.values() if s.section == section}
    for section in dict.fromkeys(s.section for s in SETTINGS.values())}


def _fields_from_settings(cls):
    """Makes `cls` a frozen dataclass with one field per setting (in SETTINGS' order, with its default) before
    the fields it declares itself."""
    cls.__annotations__ = {**{s.key: s.annotation for s in SETTINGS.values()}, **cls.__annotations__}
    for s in SETTINGS.values():
        if s.default is not REQUIRED:
            setattr(cls, s.key, s.default)
    return dataclass(frozen=True)(cls)


@_fields_from_settings
class Protocol:
    """A protocol's settings: one field per entry of SETTINGS (Protocol(name=..., tile_size=...)), and the file it
    was read from."""

    source: str = ""

    def to_dict(self) -> dict:
        """Nested like the TOML file (None values left out), for run.json and `protocols show`."""
        out: dict[str, Any] = {}
        for section, keys in SCHEMA.items():
            values = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
            if section:
                out[section] = values
            else:
                out.update(values)
        return out

    def replace(self, **overrides) -> Protocol:
        """A copy with overrides (None = keep), validated like the file.

        A bad value is a usage error (ParameterError, exit code 2) naming the setting by its protocol key.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        for key, value in given.items():
            if key not in SETTINGS:
                raise ProtocolError(f"unknown protocol setting {key!r}")
            problem = SETTINGS[key].problem(value)
            if problem:
                raise ParameterError(f"{key}: {problem}")
        # The expansion is given in µm or in px: an override of one replaces the file's choice of the other.
        if "cell_expansion_px" in given and "cell_expansion_um" not in given:
            given["cell_expansion_um"] = 0.0
        new = dataclasses.replace(self, **given)
        if "cell_expansion_um" in given and "cell_expansion_px" not in given:
            new = dataclasses.replace(new, cell_expansion_px=None)
        if new.cell_expansion_px is not None and new.cell_expansion_um:
            raise ParameterError(f"expected the cell expansion in µm or in px, got both "
                                 f"({new.cell_expansion_um:g} µm and {new.cell_expansion_px:g} px)")
        check_halo(new.tile_size, new.halo_px)
        return new


def check_pixel_size(protocol: Protocol, info) -> None:
    """A protocol that measures in µm (require_mpp) refuses a slide (SlideInfo) with no pixel size, as does a cell
    expansion given in µm."""
    from ..errors import CellsegError
    if protocol.require_mpp and info.mpp is None:
        raise CellsegError(f"protocol {protocol.name} needs the pixel size in µm, but {info.path.name} has none "
                           f"({info.mpp_source.removeprefix('none: ').split(';')[0]}); pass --mpp")
    if protocol.cell_expansion_um and info.mpp is None:
        raise CellsegError(f"a cell expansion of {protocol.cell_expansion_um:g} µm needs the pixel size, but "
                           f"{info.path.name} has none; pass --mpp, or give the expansion in px "
                           f"(--cell-expansion-px)")


def protocols_dir() -> Path:
    """The shipped presets: cellseg.protocols once installed; the checkout's protocols/ folder when cellseg runs
    from a source tree on PYTHONPATH (as on a lent GPU machine, scripts/gpu_benchmark.sh)."""
    try:
        return Path(str(resources.files("cellseg.protocols")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "protocols"


def list_protocols() -> list[str]:
    return sorted(p.stem for p in protocols_dir().glob("*.toml"))


def load_protocol(name_or_path: str | Path) -> Protocol:
    """A shipped protocol by name, or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = protocols_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise ProtocolError(f"expected a protocol name ({', '.join(list_protocols())}) or a .toml file, "
                                f"got {str(name_or_path)!r}")
    if not path.is_file():
        raise ProtocolError(f"no such protocol file: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))     # a byte-order mark (Windows editors) is no statement
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{path}: not valid TOML ({e})") from e
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SCHEMA or not key:
                raise ProtocolError(f"{path}: unknown section [{key}]; expected one of "
                                    + ", ".join(f"[{s}]" for s in SCHEMA if s))
            for sub, subvalue in value.items():
                if sub not in SCHEMA[key]:
                    raise ProtocolError(f"{path}: unknown key {sub!r} in [{key}]; expected one of "
                                        + ", ".join(SCHEMA[key]))
                _check(f"{path}: [{key}]", SCHEMA[key][sub], subvalue)
                values[sub] = subvalue
        else:
            if key not in SCHEMA[""]:
                raise ProtocolError(f"{path}: unknown key {key!r}; expected one of {', '.join(SCHEMA[''])} "
                                    f"or a section")
            _check(f"{path}:", SCHEMA[""][key], value)
            values[key] = value
    for setting in SETTINGS.values():
        if setting.default is REQUIRED and setting.key not in values:
            raise ProtocolError(f"{path}: missing key {setting.key!r}")
    model = values.get("model")
    if isinstance(model, str) and not Path(model).is_absolute() and (path.parent / model).is_dir():
        # a bundle path relative to the protocol file, as a file's paths are read: the same from any folder, and
        # recorded absolute in run.json
        values["model"] = str((path.parent / model).resolve())
    protocol = Protocol(**values, source=str(path.resolve()))
    if protocol.cell_expansion_px is not None and protocol.cell_expansion_um:
        raise ProtocolError(f"{path}: [cells] expected cell_expansion_um or cell_expansion_px, got both")
    try:
        check_halo(protocol.tile_size, protocol.halo_px)
    except ParameterError as e:
        raise ProtocolError(f"{path}: [tiling] halo_px: {e}") from None
    return protocol


def _check(where: str, setting: Setting, value: Any) -> None:
    problem = setting.problem(value)
    if problem:
        raise ProtocolError(f"{where} {setting.key}: {problem}")

"""Protocols: named analysis presets stored as TOML (protocols/*.toml, installed as cellseg.protocols).

A protocol is data with a schema: every key is declared below with its type and allowed range; an
unknown key or a bad value is an error that names the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from .errors import ParameterError, ProtocolError
from .tiling import check_halo

# section -> key -> (type, check, description). The check returns an error text or None.
_Rule = tuple[type | tuple[type, ...], Any, str]


@dataclass(frozen=True)
class _Range:
    """A setting's allowed range (bounds included; None: open). Called with a value: the error text or None."""

    lo: float | None = None
    hi: float | None = None

    def __call__(self, v):
        lo, hi = self.lo, self.hi
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"between {lo} and {hi}" if lo is not None and hi is not None else (
                f">= {lo}" if lo is not None else f"<= {hi}")
        return None


def _one_of(*choices):
    return lambda v: None if v in choices else "one of " + ", ".join(map(repr, choices))


SCHEMA: dict[str, dict[str, _Rule]] = {
    "": {
        "name": (str, None, "the protocol's name"),
        "description": (str, None, "what it is for"),
        "modality": (str, _one_of("fluorescence", "brightfield"), "imaging modality"),
    },
    "input": {
        "channel": (int, _Range(0), "channel that holds the nuclei (omit: grayscale/RGB as is)"),
        "require_mpp": (bool, None, "stop when the image has no pixel size and none is given"),
    },
    "tiling": {
        "tile_size": (int, _Range(64, 8192), "tile core size in px"),
        "halo_px": (int, _Range(0, 4096), "context around each tile, >= the largest cell diameter"),
        "batch_size": (int, _Range(1, 256), "tiles per detector call"),
    },
    "detection": {
        "model": (str, None, "bundle name shipped with cellseg, or a bundle folder"),
        "score_threshold": ((int, float), _Range(0.0, 1.0), "minimum detection score (omit: the bundle's tuned default)"),
        "mask_threshold": ((int, float), _Range(0.0, 1.0), "soft-mask probability threshold"),
        "min_area_px": (int, _Range(0), "drop cells smaller than this (fragments)"),
        "precision": (str, _one_of("auto", "fp32", "bf16"),
                      "the network's arithmetic on a CPU: bf16 where the processor has it natively (auto), or "
                      "fp32 / bf16 as given; GPUs use fp16 autocast unless fp32"),
        "nucleus_diameter_um": ((int, float), _Range(0.5, 200.0),
                                "typical nucleus diameter; with the slide's pixel size, tiles are resampled so "
                                "nuclei reach the model at its training size (omit: no resampling)"),
    },
    "tissue": {
        "tissue_method": (str, _one_of("unet", "otsu", "none"),
                          "how background is found and skipped: the U-Net, Otsu on the thumbnail, or none"),
        "min_tissue_fraction": ((int, float), _Range(0.0, 1.0),
                                "tiles whose core holds less tissue than this share are skipped before detection"),
    },
    "seams": {
        "dedupe_overlap": ((int, float), _Range(0.0, 1.0),
                           "cells from neighbouring tiles overlapping more than this (intersection over smaller) are one cell"),
    },
    # Cells by expansion (expansion.py, expansion_rows.py). 0 = nuclei only. QuPath's cell detection grows nuclei by
    # 5 µm by default (cellExpansionMicrons = 5.0); he-nuclei takes that default (it requires the pixel size, and
    # pathologists read the nucleus/cell area ratio and cytoplasmic stain off it).
    "cells": {
        "cell_expansion_um": ((int, float), _Range(0.0, 100.0),
                              "grow each nucleus by up to this many µm into an estimated cell, stopping where it "
                              "meets a neighbour's (0: nuclei only); needs the pixel size"),
        "cell_expansion_px": ((int, float), _Range(0.0, 2000.0),
                              "the same in px, for images without a pixel size (instead of cell_expansion_um)"),
    },
    "export": {
        "geojson_gzip_above_mb": ((int, float), _Range(0.0),
                                  "cells.geojson is written gzipped (cells.geojson.gz) when larger than this many MB "
                                  "(0: always)"),
    },
}


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str = ""
    modality: str = "fluorescence"
    channel: int | None = None
    require_mpp: bool = False
    tile_size: int = 512
    halo_px: int = 64
    batch_size: int = 4
    model: str = "nuclei"
    score_threshold: float | None = None
    mask_threshold: float = 0.5
    min_area_px: int = 10
    precision: str = "auto"
    nucleus_diameter_um: float | None = None
    tissue_method: str = "unet"
    min_tissue_fraction: float = 0.01
    dedupe_overlap: float = 0.5
    cell_expansion_um: float = 0.0
    cell_expansion_px: float | None = None
    geojson_gzip_above_mb: float = 500.0
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
        """A copy with command-line overrides (None = keep), validated like the file.

        A bad value is a usage error (ParameterError, exit code 2) naming the option.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        for key, value in given.items():
            section = next((s for s, keys in SCHEMA.items() if key in keys), None)
            if section is None:
                raise ProtocolError(f"unknown protocol setting {key!r}")
            try:
                option = {"halo_px": "--halo", "tissue_method": "--tissue"}.get(key, f"--{key.replace('_', '-')}")  # as cli.py names it
                _check("", option, value, SCHEMA[section][key])
            except ProtocolError as e:
                raise ParameterError(str(e)) from None
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


def setting_range(key: str) -> tuple[float | None, float | None]:
    """(lowest, highest) value the protocol setting `key` accepts (None: no bound), for the CLI's option types."""
    for keys in SCHEMA.values():
        if key in keys:
            check = keys[key][1]
            return (check.lo, check.hi) if isinstance(check, _Range) else (None, None)
    raise KeyError(f"no protocol setting {key!r}")


def check_pixel_size(protocol: Protocol, info) -> None:
    """A protocol that measures in µm (require_mpp) refuses a slide (SlideInfo) with no pixel size, as does a cell
    expansion given in µm."""
    from .errors import CellsegError
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
        return Path(__file__).resolve().parents[1] / "protocols"


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
        data = tomllib.loads(path.read_text(encoding="utf-8"))
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
                _check(f"{path}: [{key}]", sub, subvalue, SCHEMA[key][sub])
                values[sub] = subvalue
        else:
            if key not in SCHEMA[""]:
                raise ProtocolError(f"{path}: unknown key {key!r}; expected one of {', '.join(SCHEMA[''])} "
                                    f"or a section")
            _check(f"{path}:", key, value, SCHEMA[""][key])
            values[key] = value
    if "name" not in values:
        raise ProtocolError(f"{path}: missing key 'name'")
    protocol = Protocol(**values, source=str(path))
    if protocol.cell_expansion_px is not None and protocol.cell_expansion_um:
        raise ProtocolError(f"{path}: [cells] expected cell_expansion_um or cell_expansion_px, got both")
    try:
        check_halo(protocol.tile_size, protocol.halo_px)
    except ParameterError as e:
        raise ProtocolError(f"{path}: [tiling] halo_px: {e}") from None
    return protocol


def _check(where: str, key: str, value: Any, rule: _Rule) -> None:
    kind, check, _ = rule
    # bool is an int in Python; an integer setting must not accept `true`.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(f"{where} {key}: expected {names}, got {value!r}".lstrip())
    problem = check(value) if check else None
    if problem:
        raise ProtocolError(f"{where} {key}: expected {problem}, got {value!r}".lstrip())

"""report.html: one self-contained page per result folder to look at before trusting its numbers, and one per job
of slides (the cohort report).

Everything comes from the result folder (summary.json, run.json, cells.csv, overlay.png, tissue_mask.png,
labels.ome.tif) plus the slide itself for the full-resolution crops, read region by region at level 0 (never whole).
Pictures are inlined as base64 PNG, charts as SVG drawn from plain data (results/report_plots.py: Chart), and the
page is rendered from the package's Jinja2 template (templates/report.html.j2): no server, no network, no script
fetched when it is viewed. `write_report` also adds the page's warnings to summary.json (key "warnings"), where the
cohort report and scripts find them.

Per-tile counts come from cells.csv's owning tile (tile_index) on the tile grid of summary.json ("scale": tile_px,
cores from (0, 0)); a tile's tissue share from tissue_mask.png.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CellsegError, OutputError
from ..geometry import Box
from ..slides import z_text

log = logging.getLogger(__name__)

CROP_PX = 256            # side of a full-resolution crop: nuclei big enough to judge, pages still a few MB
MAX_CROPS = 12
LOW_DENSITY, HIGH_DENSITY = 200.0, 20_000.0     # cells/mm² outside this is rare for nuclei in tissue
NEAR_THRESHOLD = 0.1     # a score within this of the threshold is "near" it
SCALE_RATIO = 2.0        # nuclei this many times larger or smaller than the model's training size
SKIPPED_TISSUE = 0.1     # share of the tissue in tiles skipped as background
ASSUMED_MPP = ("none", "image-dpi")   # pixel size sources that are a guess, not the microscope's
NEAR_CROPS = 6           # crops of detections near the threshold when the count moves with it (uncertainty)
NEAR_CROP_PX = 96
NEAR_STEP = 0.05         # "near": within one step of the score curve
KEPT_BOX, BELOW_BOX = (0, 200, 255), (255, 0, 200)


@dataclass
class Crop:
    title: str
    why: str
    png: str      # base64


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OutputError(f"expected a cellseg result folder with a readable {path.name}, found {path} "
                          f"unreadable ({e})") from e


def _cells_table(folder: Path, summary: dict):
    """The cells.csv columns the report needs, read as few as possible."""
    import pandas as pd
    header = pd.read_csv(folder / "cells.csv", nrows=0).columns
    wanted = ["tile_index", "score", "area_px", "cut_at_seam", "cell_area_px", "nucleus_hematoxylin_od_mean",
              "nucleus_dab_od_mean", *[c for c in header if c.startswith(("mean_intensity_", "std_intensity_"))]]
    return pd.read_csv(folder / "cells.csv", usecols=[c for c in wanted if c in header])


@dataclass
class TileGrid:
    """The count's tile grid: cores of tile_px from (0, 0); per tile its nuclei, tissue share and density."""

    tile_px: int
    rows: int
    cols: int
    counts: np.ndarray        # (rows, cols) nuclei owned (cells.csv rows)
    cut: np.ndarray           # (rows, cols) nuclei cut at a seam
    tissue: np.ndarray        # (rows, cols) tissue share of the core
    unreadable: np.ndarray    # (rows, cols) unreadable share of the core

    def core(self, r: int, c: int, height: int, width: int) -> Box:
        t = self.tile_px
        return Box(r * t, c * t, min((r + 1) * t, height), min((c + 1) * t, width))


def tile_grid(summary: dict, cells, tissue_png: Path) -> TileGrid:
    """The count's tile grid with each tile's owned and seam-cut nuclei (cells.csv), tissue share (the tissue mask's
    pixels under its core) and unreadable share (summary.json's regions)."""
    from PIL import Image
    height, width, tile_px = summary["height_px"], summary["width_px"], int(summary["scale"]["tile_px"])
    rows, cols = -(-height // tile_px), -(-width // tile_px)
    index = cells["tile_index"].to_numpy(np.int64) if len(cells) else np.zeros(0, np.int64)
    counts = np.bincount(index, minlength=rows * cols)[:rows * cols].reshape(rows, cols)
    cut = (np.bincount(index, weights=cells["cut_at_seam"].to_numpy(bool), minlength=rows * cols)
           [:rows * cols].reshape(rows, cols) if len(cells) else np.zeros((rows, cols)))
    mask = np.asarray(Image.open(tissue_png)) > 0 if tissue_png.is_file() else np.ones((1, 1), bool)
    unreadable = np.zeros((rows, cols))
    tissue = np.zeros((rows, cols))
    fr, fc = height / mask.shape[0], width / mask.shape[1]
    for r in range(rows):
        for c in range(cols):
            r0, c0 = int(r * tile_px / fr), int(c * tile_px / fc)
            r1 = max(r0 + 1, math.ceil(min((r + 1) * tile_px, height) / fr))
            c1 = max(c0 + 1, math.ceil(min((c + 1) * tile_px, width) / fc))
            tissue[r, c] = mask[r0:r1, c0:c1].mean()
    grid = TileGrid(tile_px, rows, cols, counts, cut, tissue, unreadable)
    for region in summary.get("unreadable") or []:     # level-0 boxes, disjoint: add up each tile's share
        b = Box(*region["box"])
        for r in range(b.row0 // tile_px, -(-b.row1 // tile_px)):
            for c in range(b.col0 // tile_px, -(-b.col1 // tile_px)):
                core = grid.core(r, c, height, width)
                overlap = (max(0, min(b.row1, core.row1) - max(b.row0, core.row0))
                           * max(0, min(b.col1, core.col1) - max(b.col0, core.col0)))
                unreadable[r, c] += overlap / (core.height * core.width)
    np.minimum(unreadable, 1.0, out=unreadable)
    return grid


def tile_densities(grid: TileGrid, summary: dict) -> tuple[np.ndarray, str]:
    """Nuclei per mm² of (readable) tissue per tile (per 10⁶ px² without a pixel size); NaN without tissue."""
    height, width, mpp = summary["height_px"], summary["width_px"], summary.get("mpp")
    area = np.zeros((grid.rows, grid.cols))
    for r in range(grid.rows):
        for c in range(grid.cols):
            core = grid.core(r, c, height, width)
            area[r, c] = core.height * core.width
    area = area * grid.tissue * (1 - grid.unreadable)
    if mpp:
        area_units, unit = area * mpp ** 2 / 1e6, "cells per mm² of tissue"
    else:
        area_units, unit = area / 1e6, "cells per 10⁶ px² of tissue"
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(area_units > 0, grid.counts / area_units, np.nan)
    # a sliver of tissue at a tile's edge gives absurd densities: only tiles at least a tenth tissue
    density[grid.tissue < 0.1] = np.nan
    return density, unit


def choose_crops(grid: TileGrid, density: np.ndarray, seed: int = 0) -> list[tuple[tuple[int, int], str]]:
    """Which tiles to show, and why: the densest, the sparsest tissue tiles, any with many seam-cut nuclei, and a few
    at random (seeded); each tile once, MAX_CROPS at most."""
    chosen: dict[tuple[int, int], str] = {}

    def add(tiles, why: str, n: int) -> None:
        for rc in tiles:
            if n == 0 or len(chosen) >= MAX_CROPS:
                return
            rc = (int(rc[0]), int(rc[1]))
            if rc not in chosen:
                chosen[rc] = why
                n -= 1

    finite = np.argwhere(np.isfinite(density))
    by_density = sorted(map(tuple, finite), key=lambda rc: density[rc])
    add(reversed(by_density), "densest tile", 3)
    add(by_density, "sparsest tissue tile", 3)
    cut = [tuple(rc) for rc in np.argwhere(grid.cut > 0)]
    add(sorted(cut, key=lambda rc: -grid.cut[rc]), "many cells cut at a seam", 2)
    rng = np.random.default_rng(seed)
    pool = [tuple(rc) for rc in finite] or [tuple(rc) for rc in np.argwhere(grid.counts > 0)]
    add([pool[k] for k in rng.permutation(len(pool))] if pool else [], "random tile (seed 0)", 3)
    return list(chosen.items())


def read_crops(grid: TileGrid, chosen, summary: dict, slide, labels_path: Path) -> list[Crop]:
    """The chosen tiles' centre CROP_PX² at level 0 from the slide and from labels.ome.tif, outlined."""
    from ..slides import open_slide
    from .report_plots import outlined_png
    height, width = summary["height_px"], summary["width_px"]
    crops = []
    with open_slide(labels_path) as labels:
        for (r, c), why in chosen:
            core = grid.core(r, c, height, width)
            # centred on the tile and within its core (a tile smaller than a crop is shown whole: pixels beyond it may
            # lie outside what was analysed, e.g. outside --regions), moved inside the slide rather than cut by its edge
            side = min(CROP_PX, grid.tile_px)
            r0 = max(core.row0, min((core.row0 + core.row1) // 2 - side // 2, height - side))
            c0 = max(core.col0, min((core.col0 + core.col1) // 2 - side // 2, width - side))
            box = Box(r0, c0, min(height, r0 + side, core.row1), min(width, c0 + side, core.col1))
            pixels = slide.read_region(box)
            png = outlined_png(pixels, labels.read_region(box)[..., 0])
            crops.append(Crop(f"tile ({r}, {c}): {int(grid.counts[r, c])} cells, rows {box.row0}:{box.row1} "
                              f"cols {box.col0}:{box.col1}", why, _b64(png)))
    return crops


def colour_columns(cells) -> list[str] | None:
    """cells.csv's mean intensity columns of a colour slide's red, green and blue (named as planning.channel_names
    names them: R, G, B in files of old versions), None when it has none."""
    for names in (("red", "green", "blue"), ("R", "G", "B")):
        columns = [f"mean_intensity_{c}" for c in names]
        if all(c in cells for c in columns):
            return columns
    return None


def intensity_values(cells, summary: dict) -> tuple[np.ndarray | None, str]:
    """The nuclear stain per nucleus: hematoxylin OD (grown cells measure it per nucleus; otherwise the OD of the
    nucleus's mean colour, skimage.color.rgb2hed) for brightfield RGB, else the model channel's mean intensity."""
    if "nucleus_hematoxylin_od_mean" in cells:
        return cells["nucleus_hematoxylin_od_mean"].to_numpy(float), "nucleus hematoxylin OD (mean)"
    rgb = colour_columns(cells)
    if rgb and summary.get("channels") == 3:
        from ..cells import mean_colour_stains
        colours = np.stack([cells[c].to_numpy(float) for c in rgb], axis=1)
        return mean_colour_stains(colours, summary.get("dtype") or "uint8",
                                  summary.get("stain_white"))[:, 0], \
            "hematoxylin OD of the nucleus's mean colour"
    names = [c for c in cells.columns if c.startswith("mean_intensity_")]
    channel = summary.get("model_channel")
    if not names:
        return None, ""
    name = names[channel] if isinstance(channel, int) and channel < len(names) else names[0]
    return cells[name].to_numpy(float), f"{name[len('mean_intensity_'):]} mean intensity"


def slide_warnings(summary: dict, run: dict, cells, grid: TileGrid | None) -> list[str]:
    """Why a number might not be trusted, each a sentence."""
    from .summary import no_tissue_warning
    warnings = []
    source = str(summary.get("mpp_source") or "none")
    if summary.get("mpp") is None or source.split(":")[0] in ASSUMED_MPP:
        warnings.append(f"pixel size assumed or unknown ({source}): areas and densities depend on it; pass --mpp")
    scale = summary.get("scale") or {}
    if scale.get("warning"):       # the pixel size and the measured nuclei disagree (planning.decide_scale)
        warnings.append(scale["warning"])
    looks = summary.get("looks_like") or {}
    if looks.get("warning"):       # a brightfield slide counted as fluorescence, or back (planning/modality.py)
        warnings.insert(0, looks["warning"])
    if summary.get("tissue_area_px") == 0 and summary.get("tiles_total"):
        warnings.insert(0, no_tissue_warning(summary.get("tissue_method") or "tissue"))
    warnings[:0] = summary.get("file_warnings") or []     # first: part of the file was not counted at all
    area = summary.get("area_px") or {}
    if area.get("median") and scale.get("model_diameter_px"):
        network_diameter = 2 * math.sqrt(area["median"] / math.pi) * float(scale.get("factor") or 1)
        ratio = network_diameter / scale["model_diameter_px"]
        if not 1 / SCALE_RATIO <= ratio <= SCALE_RATIO:
            warnings.append(f"nuclei reach the model at {network_diameter:.1f} px, {ratio:.2g}x its training size "
                            f"({scale['model_diameter_px']:.1f} px): pass --diameter")
    threshold = (run.get("model") or {}).get("score_threshold")
    if threshold is not None and len(cells) and "score" in cells:
        # at most half the room above the threshold: from 0.9 up, "within 0.1" would hold every score there is
        band = min(NEAR_THRESHOLD, (1.0 - threshold) / 2)
        near = float(np.mean(cells["score"].to_numpy(float) < threshold + band))
        if near > 0.5:
            warnings.append(f"{near:.0%} of the nuclei score within {band:.2g} of the threshold {threshold:.2f}: "
                            f"the count depends on it")
    density = summary.get("cells_per_mm2")
    if density is not None and not LOW_DENSITY <= density <= HIGH_DENSITY:
        warnings.append(f"unusual density: {density:,.0f} cells per mm² of tissue (usual {LOW_DENSITY:,.0f} to "
                        f"{HIGH_DENSITY:,.0f})")
    fraction = summary.get("min_tissue_fraction")
    if grid is not None and fraction is not None and grid.tissue.sum() > 0:
        skipped = float(grid.tissue[(grid.tissue < fraction) & (grid.counts == 0)].sum() / grid.tissue.sum())
        if skipped > SKIPPED_TISSUE:
            warnings.append(f"{skipped:.0%} of the tissue lies in tiles skipped as background "
                            f"(min tissue fraction {fraction})")
    unreadable = summary.get("unreadable") or []
    if unreadable:
        warnings.append(f"{len(unreadable)} unreadable region(s), {summary.get('unreadable_area_px', 0):,} px, left "
                        f"out of the count, the tissue area and the density (--skip-unreadable)")
    return warnings


REGION_ROWS = 200      # regions listed on the page; the rest only in regions.csv (a page of thousands is no table)


def _template(name: str):
    return _templates().get_template(name)


@functools.cache
def _templates():
    """One jinja2 environment per process, so that its compiled templates are kept: compiling report.html.j2 took
    ~0.04 s of every report (a batch of small fields writes one a field)."""
    import jinja2
    env = jinja2.Environment(loader=jinja2.PackageLoader("cellseg", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    env.filters["num"] = _num
    return env


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):,.{digits}g}" if abs(float(value)) < 1e6 else f"{float(value):,.0f}"


def write_report(folder: Path, slide=None, record: dict | None = None, pictures: Callable[[], None] | None = None,
                 label_images: Callable[[], None] | None = None, times_final: bool = True) -> list[str]:
    """Write `folder`/report.html from the result files there, and its warnings (and the appearance check,
    results/appearance.py) into summary.json. slide: the open slide for the crops (None: opened from run.json's path,
    and the crops left out when it is not there); record: a summary dict to update the same way; pictures: waits until
    overlay.png is written, called before it is read (a count draws the figures meanwhile); label_images: waits
    until labels.ome.tif is written (a count draws the rest of the report while it is), called before the crops;
    times_final: False when summary.json's times are not yet the count's last (a count writes its report before
    it ends: the page says its total is the time until then). Returns the warnings."""
    from .appearance import appearance_check, appearance_warning
    from .report_plots import histogram_chart, score_curve_chart
    from .uncertainty import curve_warning
    folder = Path(folder)
    # a finished count with --outputs that left out what the page is drawn from (results/writer.REPORT_NEEDS); a
    # count drawing its page (pictures given) writes overlay.png meanwhile
    missing = [name for name in ("cells.csv", "overlay.png")
               if not (folder / name).is_file() and not (name == "overlay.png" and pictures is not None)]
    if missing:
        raise OutputError(f"expected {' and '.join(missing)} in {folder} to draw its report, found "
                          f"{'them' if len(missing) > 1 else 'it'} missing (a count with --outputs leaving "
                          f"{'them' if len(missing) > 1 else 'it'} out writes no report)")
    summary, run = _read_json(folder / "summary.json"), _read_json(folder / "run.json")
    cells = _cells_table(folder, summary)
    grid = tile_grid(summary, cells, folder / "tissue_mask.png")
    density, unit = tile_densities(grid, summary)
    warnings = slide_warnings(summary, run, cells, grid)
    mpp = summary.get("mpp")
    area_unit = "µm²" if mpp else "px"
    area_scale = mpp ** 2 if mpp else 1
    # drawn by the page (inline SVG); the nucleus area chart is the plot area_histogram.png holds
    charts = [histogram_chart(cells["area_px"].to_numpy(float) * area_scale, f"nucleus area ({area_unit})",
                              "Nucleus area")]
    if "cell_area_px" in cells:
        charts.append(histogram_chart(cells["cell_area_px"].to_numpy(float) * area_scale, f"cell area ({area_unit})",
                                      "Cell area (grown from nuclei)"))
    stain, stain_label = intensity_values(cells, summary)
    if stain is not None:
        charts.append(histogram_chart(stain, stain_label, "Nuclear stain"))
    if len(cells):
        threshold = (run.get("model") or {}).get("score_threshold")
        charts.append(histogram_chart(cells["score"].to_numpy(float), "detection score", "Scores",
                                      {"threshold": threshold} if threshold is not None else None))
    curve, estimate = summary.get("score_curve"), summary.get("count_estimate")
    moved = curve_warning(curve) if curve else None
    if moved:
        warnings.append(moved)
    appearance = appearance_check(summary, run, cells)      # unlike anything validated (results/appearance.py)
    unlike = appearance_warning(appearance)
    if unlike:
        warnings.insert(0, unlike)
    curve_chart = score_curve_chart(curve, estimate) if curve else None
    if pictures is not None:
        pictures()
    heatmap, heatmap_scale = _density_map(folder, grid, density, summary)
    if label_images is not None:
        label_images()
    crops, crops_note, near_crops = [], "", []
    chosen = choose_crops(grid, density)
    if chosen:
        try:
            if slide is None:
                from ..slides import open_slide
                with open_slide(run["slide"], mpp=mpp, z=run.get("z"), series=run.get("series"),
                                t=run.get("t")) as opened:
                    crops = read_crops(grid, chosen, summary, opened, folder / "labels.ome.tif")
            else:
                crops = read_crops(grid, chosen, summary, slide, folder / "labels.ome.tif")
            if moved:
                near_crops = _with_slide(slide, run, mpp, lambda s: near_threshold_crops(folder, summary, curve, s))
        except (CellsegError, OSError) as e:   # a report without crops beats no report; the page says why
            crops_note = f"crops left out: the slide could not be read ({e})"
            log.warning("%s: %s", folder.name, crops_note)
    page = _template("report.html.j2").render(
        summary=summary, run=run, warnings=warnings, overlay=_b64((folder / "overlay.png").read_bytes()),
        z_read=z_text(summary.get("z"), summary["z_planes"]) if (summary.get("z_planes") or 1) > 1 else None,
        heatmap=heatmap, heatmap_scale=heatmap_scale,
        density_unit=unit, charts=charts,
        crops=crops, crops_note=crops_note, unreadable=summary.get("unreadable") or [],
        estimate=estimate, curve=curve, curve_chart=curve_chart, near_crops=near_crops, curve_moved=moved,
        model={"name": None, "weights_sha256": None, "score_threshold": None, **(run.get("model") or {})},
        tile_px=grid.tile_px, tiles_with_cells=int((grid.counts > 0).sum()), times_final=times_final,
        region_rows=REGION_ROWS)
    from .folder import atomic_write_text
    atomic_write_text(folder / "report.html", page)
    summary["warnings"] = warnings
    if appearance is not None:
        summary["appearance"] = appearance
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, default=str))
    if record is not None:      # the caller's summary gains what the report added
        record.update(warnings=warnings, **({"appearance": appearance} if appearance is not None else {}))
    return warnings


def _with_slide(slide, run: dict, mpp, read):
    """read(slide) with the open slide, or the slide run.json names opened for it."""
    if slide is not None:
        return read(slide)
    from ..slides import open_slide
    with open_slide(run["slide"], mpp=mpp, z=run.get("z"), series=run.get("series"), t=run.get("t")) as opened:
        return read(opened)


def near_threshold_crops(folder: Path, summary: dict, curve: dict, slide, seed: int = 0) -> list[Crop]:
    """Crops of detections scoring within NEAR_STEP of the threshold, half kept (cells.csv, boxed in blue) and half
    not (below_threshold.csv, boxed in magenta), chosen at random (seeded); NEAR_CROPS at most."""
    import pandas as pd

    from .report_plots import boxed_png
    from .uncertainty import BELOW_FILE
    threshold = float(curve["threshold"])
    box_columns = ["bbox_row0_px", "bbox_col0_px", "bbox_row1_px", "bbox_col1_px"]
    cells = pd.read_csv(folder / "cells.csv", usecols=["score", *box_columns])
    kept = cells[(cells["score"] >= threshold) & (cells["score"] < threshold + NEAR_STEP)]
    below = pd.read_csv(folder / BELOW_FILE) if (folder / BELOW_FILE).is_file() else pd.DataFrame()
    if len(below):
        below = below[below["score"] >= threshold - NEAR_STEP]
    rng = np.random.default_rng(seed)
    picks = []
    for table, columns, kind in ((kept, box_columns, "kept"),
                                 (below, ["row0_px", "col0_px", "row1_px", "col1_px"], "not kept")):
        rows = rng.permutation(len(table))[:NEAR_CROPS // 2] if len(table) else []
        picks += [(table.iloc[int(k)][columns].to_numpy(float), float(table.iloc[int(k)]["score"]), kind)
                  for k in rows]
    height, width = summary["height_px"], summary["width_px"]
    out = []
    with _open_labels(folder) as labels:
        for box, score, kind in picks:
            centre_row, centre_col = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            r0 = int(max(0, min(height - NEAR_CROP_PX, centre_row - NEAR_CROP_PX / 2)))
            c0 = int(max(0, min(width - NEAR_CROP_PX, centre_col - NEAR_CROP_PX / 2)))
            crop = Box(r0, c0, min(height, r0 + NEAR_CROP_PX), min(width, c0 + NEAR_CROP_PX))
            png = boxed_png(slide.read_region(crop), labels.read_region(crop)[..., 0],
                            (box[0] - r0, box[1] - c0, box[2] - r0, box[3] - c0),
                            KEPT_BOX if kind == "kept" else BELOW_BOX)
            out.append(Crop(f"score {score:.3f} at rows {int(box[0])}:{int(np.ceil(box[2]))} cols "
                            f"{int(box[1])}:{int(np.ceil(box[3]))}",
                            f"{kind} at the threshold {threshold:.2f}", _b64(png)))
    return out


def _open_labels(folder: Path):
    from ..slides import open_slide
    return open_slide(folder / "labels.ome.tif")


def _density_map(folder: Path, grid: TileGrid, density: np.ndarray, summary: dict) -> tuple[str | None, dict | None]:
    """The density per tile over the overlay, as base64 PNG, and its colour scale (report_plots.density_scale);
    None for a one-tile slide, whose density is the slide's (the page states it) and whose map would be one square."""
    if grid.rows * grid.cols == 1:
        return None, None
    from imagecodecs import png_decode
    from PIL import Image

    from .report_plots import density_scale, heatmap_png
    overlay = png_decode((folder / "overlay.png").read_bytes())     # libpng: half of Pillow's time for the overlay
    overlay = overlay if overlay.ndim == 3 else np.repeat(overlay[..., None], 3, axis=2)
    # the map's backdrop at most ~800 px (a 2048² overlay costs seconds to draw for nothing), by averaging whole
    # blocks of pixels: a quarter of the time of a filtered thumbnail, and the same picture under the map's squares
    backdrop = Image.fromarray(np.ascontiguousarray(overlay[..., :3])).reduce(max(1, -(-max(overlay.shape[:2]) // 800)))
    png = heatmap_png(np.asarray(backdrop), density, summary["height_px"], summary["width_px"], grid.tile_px)
    return _b64(png), density_scale(density)


@dataclass
class CohortRow:
    """One slide of a job: its result folder and summary, or the error that failed it."""

    name: str
    folder: Path | None = None
    summary: dict | None = None
    error: str | None = None


def result_folders(paths: list[Path]) -> tuple[list[Path], Path | None]:
    """The result folders named by `paths` (a result folder itself, or a parent of several), and the cohort
    report's folder: the one parent named, else the result folders' common parent when there are several (None
    for one result folder)."""
    import os
    folders, parents = [], []
    for path in paths:
        path = Path(path)
        if (path / "summary.json").is_file():
            folders.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if (p / "summary.json").is_file())
            if not found:
                raise OutputError(f"expected a cellseg result folder or a folder of them, found none in {path}")
            folders += found
            parents.append(path)
        else:
            raise OutputError(f"expected a cellseg result folder (with summary.json), found {path}")
    # a folder named twice (itself and through its parent) is one slide of the cohort
    folders = list({f.resolve(): f for f in folders}.values())
    if len(parents) == 1 and len(paths) == 1:
        return folders, parents[0]
    if len(folders) < 2:
        return folders, None
    return folders, Path(os.path.commonpath([str(f.resolve().parent) for f in folders]))


def check_cohort_report_target(folder: Path, hint: str) -> None:
    """Refuse to replace a `folder`/report.html that is not a cohort report cellseg wrote (the user's own page, or
    a slide's report where a slide's result folder is asked to hold a cohort's): by its title, templates/
    cohort.html.j2. hint: what the user can do instead."""
    path = Path(folder) / "report.html"
    if path.is_dir() or (path.exists()
                         and "<title>cellseg cohort report:" not in path.read_text(errors="replace")[:1000]):
        raise OutputError(f"expected {path} to be absent or a cellseg cohort report, found another file; {hint}")


def write_cohort_report(folder: Path, rows: list[CohortRow]) -> Path:
    """`folder`/report.html: one row per slide (count, density, tissue area, warnings or error, a link to its own
    report) in a sortable table, and a plot of density per slide."""
    import os

    from .folder import atomic_write_text
    from .report_plots import density_bars_chart
    folder = Path(folder)
    table = []
    for row in rows:
        s = row.summary or {}
        link = None
        if row.folder is not None and (row.folder / "report.html").is_file():
            link = Path(os.path.relpath(row.folder / "report.html", folder)).as_posix()
        in_regions = "tissue_area_in_regions_mm2" in s      # --regions: the density is per mm² of the tissue in them
        table.append({"name": row.name, "link": link, "error": row.error, "cells": s.get("cell_count"),
                      "density": s.get("cells_per_mm2"), "in_regions": in_regions,
                      "tissue_mm2": s.get("tissue_area_in_regions_mm2" if in_regions else "tissue_area_mm2"),
                      "mpp": s.get("mpp"), "unreadable": len(s.get("unreadable") or []),
                      "warnings": s.get("warnings") or []})
    plot = density_bars_chart([r["name"] for r in table], [r["density"] for r in table], "cells per mm² of tissue")
    page = _template("cohort.html.j2").render(rows=table, plot=plot,
                                               failed=sum(r["error"] is not None for r in table))
    atomic_write_text(folder / "report.html", page)
    return folder / "report.html"

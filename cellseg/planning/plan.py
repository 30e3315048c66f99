"""What to do with one slide, decided before its tiles are detected: the `SlidePlan`.

    slide -> model channel -> thumbnail -> tissue mask (tissue/finder.py) -> intensity range on the tissue
          -> scale (--diameter, the protocol's nucleus size, or measured: --diameter auto) -> tiles (core + halo)
          -> which tiles hold enough tissue to analyse -> the windows the slide's normalisation is measured on

Every decision depends on the slide and the protocol only, never on how the tiles will later be grouped or
scheduled: the plan is plain data, so the tiles of one plan can be detected in any order, in any process, with a
detector calibrated on `plan.windows` (calibrate), and give the same cells.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..cells import CellExpansion, context_rows, expansion_distance_px, stains_apply
from ..errors import ParameterError
from ..geometry import Band, Box, TileDetector, TileSpec, plan_bands, plan_tiles, seam_band_px
from ..slides import Slide, SlideInfo
from ..tissue import TissueFinder, TissueMask
from ..util import StageTimer, release_freed_memory
from .intensity import IntensityRange, as_network_input, gray_input, measure_range, select_channels, to_network_input
from .protocol import Protocol, check_pixel_size
from .regions import RegionFile, Regions

THUMBNAIL_SIDE = 2048
CALIBRATION_WINDOW_PX = 512   # network px; the side of each window the slide's normalisation is measured on
CALIBRATION_WINDOWS = 4
_NUCLEAR_STAINS = re.compile(r"dapi|hoechst|nuc|draq|sytox|hematox", re.IGNORECASE)


@dataclass(frozen=True)
class Scale:
    """How the slide is resampled for the network: `factor` network px per slide px."""

    factor: float
    source: str
    model_diameter_px: float | None = None
    image_diameter_px: float | None = None


NATIVE = Scale(1.0, "native")


@dataclass(frozen=True)
class NetworkInput:
    """How a slide's native pixels become the network's input: the model channel (None: grayscale or RGB as is),
    the slide's intensity range and the scale. Every read for the network (calibration windows, tiles, --diameter
    auto's samples) goes through one, so the three never part. gray: that input has no colour (intensity.gray_input
    on the tissue of the thumbnail), so the slide gets its modality's gray score threshold (TileDetector.calibrated)."""

    channel: int | None
    intensity: IntensityRange
    scale: Scale = NATIVE
    gray: bool = False

    def of(self, raw: np.ndarray, box: Box) -> np.ndarray:
        """`raw`, the slide's native pixels in `box`, as the network sees them (preprocess.as_network_input)."""
        return as_network_input(raw, box.shape, self.channel, self.intensity, self.scale.factor)

    def read(self, slide: Slide, box: Box) -> np.ndarray:
        """The slide's pixels in `box` as the network sees them."""
        return self.of(slide.read_region(box), box)


@dataclass
class SlidePlan:
    """The decisions for one slide (level-0 px throughout).

    network: the model channel, the intensity range and the scale the tiles reach the network with; channel_names:
    every channel's name in cells.csv. thumbnail: (h, w, C) native pixels, thumb_factor slide px per thumbnail px.
    tiles: the whole grid in row-major order (tile_px core, halo_px halo, in slide px); keep[i]: tile i is analysed
    (enough tissue).
    windows: where the slide's normalisation is measured (empty when no tile is analysed). cell_expansion_px: D,
    how far nuclei are grown into cells (level-0 px; 0: nuclei only; cells/expansion.py). regions: the count is restricted
    to these (planning/regions.py; None: the whole slide): only tiles near one are analysed (region_tiles).
    """

    network: NetworkInput
    channel_names: list[str]
    thumbnail: np.ndarray
    thumb_factor: float
    tissue: TissueMask
    tile_px: int
    halo_px: int
    tiles: list[TileSpec]
    keep: list[bool]
    windows: list[Box]
    cell_expansion_px: float = 0.0
    regions: Regions | None = None

    @property
    def analysed(self) -> list[TileSpec]:
        """The tiles the detector sees, in grid order."""
        return [t for t, k in zip(self.tiles, self.keep) if k]

    @property
    def tiles_per_row(self) -> int:
        return sum(1 for t in self.tiles if t.grid_row == 0)

    def bands(self, band_rows: int | None = None) -> list[Band]:
        """The grid cut into bands of whole tile rows (tiling.plan_bands)."""
        return plan_bands(len(self.tiles) // self.tiles_per_row, self.tiles_per_row, band_rows)

    def cell_expansion(self, info: SlideInfo, modality: str) -> CellExpansion | None:
        """How this slide's nuclei are grown into cells, or None when the plan draws nuclei only (D = 0)."""
        if not self.cell_expansion_px:
            return None
        return CellExpansion(self.cell_expansion_px, context_rows(self.cell_expansion_px, self.tile_px, self.halo_px),
                             (info.height, info.width), self.tissue, info.mpp, list(self.channel_names),
                             stains_apply(modality, info.n_channels))


def plan_slide(slide: Slide, protocol: Protocol, detector: TileDetector, tissue: TissueFinder, timer: StageTimer,
               model_diameter_px: float | None = None, diameter_px: float | str | None = None,
               regions: RegionFile | None = None) -> SlidePlan:
    """Decide everything about `slide` before detection (the detector runs here only for --diameter auto).

    model_diameter_px: the bundle's training nucleus size; diameter_px: this image's (--diameter), or "auto" to
    measure it on a few tiles first (measure_diameter). regions: count only there (planning/regions.py).
    """
    info = slide.info
    check_pixel_size(protocol, info)
    channel = model_channel(protocol, slide)
    with timer("read"):
        thumbnail, thumb_factor = slide.read_thumbnail(THUMBNAIL_SIDE)
    with timer("tissue"):
        tissue_mask = tissue.find(slide, protocol.modality)
        release_freed_memory()   # the view grows with the slide; detection must not start on top of it
    with timer("read"):
        on_tissue = tissue_pixels(select_channels(thumbnail, channel), tissue_mask, info.height, info.width)
        intensity = measure_range(on_tissue)
        # every k-th tissue pixel: a whole-slide thumbnail's millions say no more about colour than a million
        gray = gray_input(to_network_input(on_tissue[::max(1, len(on_tissue) >> 20)][None], intensity))
    luminance = select_channels(thumbnail, channel).astype(np.float32).mean(-1)
    if diameter_px == "auto":
        with timer("detect"):
            measured = measure_diameter(slide, detector, NetworkInput(channel, intensity, gray=gray), protocol,
                                        thumbnail, thumb_factor, tissue_mask)
        scale = (choose_scale(model_diameter_px, measured[0], protocol, info.mpp,
                              source=f"measured on {measured[1]} nuclei of the slide (--diameter auto)")
                 if measured else Scale(1.0, "native: too few nuclei found to measure their size",
                                        model_diameter_px or None))
    else:
        scale = choose_scale(model_diameter_px, diameter_px, protocol, info.mpp)
    tile_px, halo_px = tile_geometry(protocol, scale)
    tiles = plan_tiles(info.height, info.width, tile_px, halo_px)
    # A tile is skipped when its core holds too little tissue: none of its cells could be real.
    keep = [tissue.method == "none" or tissue_mask.box_fraction(t.core) >= protocol.min_tissue_fraction
            for t in tiles]
    in_regions = None
    if regions is not None:
        # Regions: a tile is analysed only when it is near one (region_tiles; it is never read otherwise).
        in_regions = regions.in_pixels(info.mpp, info.height, info.width)
        keep = [bool(k and m) for k, m in zip(keep, region_tiles(tiles, in_regions, halo_px))]
    # One normalisation for the whole slide, measured where the cells are: a cell then looks the same to the
    # network whatever tile it falls in (detection/slide_norm.py). Chosen on the whole slide's tissue even when
    # counting in regions: a region's nuclei must not depend on what else was asked (4 windows, read wherever they
    # lie). Nothing to measure when no tile is analysed.
    windows = (calibration_windows(info.height, info.width, max(16, round(CALIBRATION_WINDOW_PX / scale.factor)),
                                   luminance, thumb_factor, tissue_mask) if any(keep) else [])
    return SlidePlan(NetworkInput(channel, intensity, scale, gray), channel_names(slide), thumbnail, thumb_factor,
                     tissue_mask, tile_px, halo_px, tiles, keep, windows,
                     expansion_distance_px(protocol.cell_expansion_um, protocol.cell_expansion_px, info.mpp),
                     in_regions)


def region_tiles(tiles: list[TileSpec], regions: Regions, halo_px: int) -> list[bool]:
    """Which tiles a count in `regions` analyses: those whose core comes within 2 halos and the seam band of one.

    A nucleus whose centroid lies in a region (no wider than the halo, as the seam rule asks) reaches at most a halo
    beyond it; a nucleus that could duplicate it or share its pixels then has its centroid within 2 halos of the
    region, and is kept by a tile whose core grown by the seam band holds that centroid. The merge so sees, around
    each nucleus of a region, what a whole-slide count sees: a region's nuclei are the whole slide's, mask for mask
    (a tile whose core merely meets the region would leave out a neighbour's view of a nucleus on its border).
    """
    margin = 2 * halo_px + seam_band_px(halo_px)
    return [bool(m) for m in regions.meets(np.array([tuple(t.core.grown(margin)) for t in tiles], np.int64))]


def calibrate(detector: TileDetector, slide: Slide, windows: list[Box], network: NetworkInput) -> TileDetector:
    """The detector with the slide-level statistics of the network input of `windows` (TileDetector.calibrated)."""
    return detector.calibrated([network.read(slide, b) for b in windows], gray=network.gray)


def channel_names(slide: Slide) -> list[str]:
    """Each channel's name as cells.csv columns carry it: the file's names made safe, else red/green/blue or c0..."""
    info = slide.info
    if info.channel_names and len(info.channel_names) == info.n_channels:
        names = [re.sub(r"[^0-9A-Za-z]+", "_", n).strip("_").lower() or f"c{i}"
                 for i, n in enumerate(info.channel_names)]
        if len(set(names)) == len(names):
            return names
    if info.n_channels == 3:
        return ["red", "green", "blue"]
    return [f"c{i}" for i in range(info.n_channels)]


def model_channel(protocol: Protocol, slide: Slide) -> int | None:
    """Which slide channel the detector sees (None: grayscale or RGB as is).

    The protocol's or --channel's choice wins; otherwise a channel named like a nuclear stain (DAPI,
    Hoechst, ...), else an RGB image as is, else channel 0.
    """
    info = slide.info
    if info.n_channels == 1:
        return 0
    if protocol.channel is not None:
        return protocol.channel
    for k, name in enumerate(info.channel_names or ()):
        if name and _NUCLEAR_STAINS.search(name):
            return k
    return None if info.n_channels == 3 else 0


def choose_scale(model_diameter_px: float | None, diameter_px: float | None, protocol: Protocol,
                 mpp: float | None, source: str = "--diameter") -> Scale:
    """Resample so nuclei reach the network at the size it was trained on (Cellpose's --diameter idea).

    The image's nucleus diameter comes from --diameter (px) or the protocol's nucleus_diameter_um and the
    slide's pixel size; without either, or without a size recorded in the bundle, tiles run as they are.
    """
    if diameter_px is not None:
        image_d = float(diameter_px)
    elif protocol.nucleus_diameter_um is not None and mpp:
        image_d = protocol.nucleus_diameter_um / mpp
        source = f"protocol nucleus_diameter_um {protocol.nucleus_diameter_um} µm at {mpp:g} µm/px"
    else:
        return Scale(1.0, "native: no nucleus diameter given (--diameter or the protocol's nucleus_diameter_um)",
                     model_diameter_px or None)
    if not model_diameter_px:
        return Scale(1.0, "native: the model bundle records no training nucleus size", None, image_d)
    factor = model_diameter_px / image_d
    if not 1 / 8 <= factor <= 4:
        raise ParameterError(f"expected a nucleus diameter within 1/4 to 8 times the model's "
                             f"{model_diameter_px:.1f} px, got {image_d:.1f} px ({source})")
    if abs(factor - 1) < 0.1:   # within 10 %: resampling would cost time and gain nothing
        return Scale(1.0, f"native: {source} is within 10 % of the model's size", model_diameter_px, image_d)
    return Scale(factor, source, model_diameter_px, image_d)


def tile_geometry(protocol: Protocol, scale: Scale) -> tuple[int, int]:
    """Tile core and halo in slide px, so that the network still sees tile_size x tile_size at `scale`."""
    tile_px = max(16, round(protocol.tile_size / scale.factor))
    return tile_px, min(math.ceil(protocol.halo_px / scale.factor), tile_px // 2)


def measure_diameter(slide: Slide, detector: TileDetector, native: NetworkInput, protocol: Protocol,
                     thumbnail: np.ndarray, thumb_factor: float, tissue: TissueMask | None = None,
                     n_tiles: int = 6) -> tuple[float, int] | None:
    """Median equivalent diameter (px) of the nuclei found at native scale on the slide's busiest tiles.

    Tiles are ranked by pixel contrast on the thumbnail, so glass and empty background are not sampled.
    native: the slide's network input at native scale. Returns (diameter, number of nuclei) or None when fewer than
    10 nuclei were found.
    """
    tiles = plan_tiles(slide.info.height, slide.info.width, protocol.tile_size, protocol.halo_px)
    luminance = select_channels(thumbnail, native.channel).astype(np.float32).mean(-1)
    chosen = sorted(tiles, key=lambda t: thumbnail_contrast(luminance, t.core, thumb_factor), reverse=True)[:n_tiles]
    windows = calibration_windows(slide.info.height, slide.info.width, CALIBRATION_WINDOW_PX, luminance,
                                  thumb_factor, tissue)
    calibrated = calibrate(detector, slide, windows, native)
    images = [native.read(slide, t.read) for t in chosen]
    areas = np.array([m.sum() for det in calibrated.detect(images, chosen) for m in det.masks], np.float64)
    if areas.size < 10:
        return None
    return float(np.median(2 * np.sqrt(areas / np.pi))), int(areas.size)


def thumbnail_contrast(gray_thumbnail: np.ndarray, box: Box, thumb_factor: float) -> float:
    """Standard deviation of the thumbnail over `box` (level-0 px): high where cells are, ~0 on glass."""
    r0, c0 = int(box.row0 / thumb_factor), int(box.col0 / thumb_factor)
    r1, c1 = max(int(box.row1 / thumb_factor), r0 + 1), max(int(box.col1 / thumb_factor), c0 + 1)
    return float(gray_thumbnail[r0:r1, c0:c1].std())


def calibration_windows(height: int, width: int, window_px: int, gray_thumbnail: np.ndarray, thumb_factor: float,
                        tissue: TissueMask | None, n: int = CALIBRATION_WINDOWS) -> list[Box]:
    """Up to `n` windows of window_px x window_px (slide px) on a fixed grid, where the cells are.

    They depend on the slide only (not on the tile size): the normalisation measured on them is the same
    whatever tiles the slide is cut into. Ranked by thumbnail contrast times tissue share, so glass and empty
    dark field are not chosen. A slide smaller than a window gives one window: the whole slide. Counting in regions
    does not change them (plan_slide).
    """
    wh, ww = min(window_px, height), min(window_px, width)
    candidates = [Box(r, c, r + wh, c + ww) for r in range(0, height - wh + 1, wh)
                  for c in range(0, width - ww + 1, ww)]

    def score(box: Box) -> float:
        share = tissue.box_fraction(box) if tissue is not None else 1.0
        return thumbnail_contrast(gray_thumbnail, box, thumb_factor) * share

    ranked = sorted(candidates, key=lambda b: (-score(b), b.row0, b.col0))
    return ranked[:n]


def tissue_pixels(thumbnail: np.ndarray, tissue: TissueMask, height: int, width: int,
                  min_pixels: int = 1000) -> np.ndarray:
    """The thumbnail's pixels (n, C) that lie on tissue, or all of them when tissue is scarcer than `min_pixels`.

    The intensity range is measured on these: on a slide that is 99 % glass, percentiles of the whole
    thumbnail describe the glass, and the cells would be squashed into saturation.
    """
    th, tw = thumbnail.shape[:2]
    rows = ((np.arange(th) + 0.5) * height / th).astype(np.int64)
    cols = ((np.arange(tw) + 0.5) * width / tw).astype(np.int64)
    on = tissue.at(rows, cols)
    if on.sum() < min(min_pixels, on.size):
        return thumbnail.reshape(-1, thumbnail.shape[-1])
    return thumbnail[on]


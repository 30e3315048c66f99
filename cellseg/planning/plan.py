"""What to do with one slide, decided before its tiles are detected: the `SlidePlan`.

    slide -> model channel -> thumbnail -> tissue mask (tissue/finder.py) -> intensity range on the tissue
          -> scale (--diameter, the protocol's nucleus size, or measured: --diameter auto) -> tiles (core + halo)
          -> which tiles hold enough tissue to analyse -> the windows the slide's normalisation is measured on

Every decision depends on the slide and the protocol only, never on how the tiles will later be grouped or
scheduled: the plan is plain data, so the tiles of one plan can be detected in any order, in any process, with a
detector calibrated on `plan.windows` (calibrate), and give the same cells.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..cells import CellExpansion, context_rows, expansion_distance_px, stain_white, stains_apply
from ..errors import ParameterError
from ..geometry import Band, Box, TileDetector, TileSpec, plan_bands, plan_tiles, seam_band_px
from ..slides import Slide, SlideInfo
from ..tissue import TissueFinder, TissueMask
from ..util import StageTimer, release_freed_memory
from .intensity import IntensityRange, as_network_input, gray_input, measure_range, select_channels, to_network_input
from .modality import Look, slide_look
from .protocol import Protocol, check_pixel_size
from .regions import RegionFile, Regions

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..bundles import MicronScale
    from ..geometry import TileDetections

THUMBNAIL_SIDE = 2048
CALIBRATION_WINDOW_PX = 512   # network px; the side of each window the slide's normalisation is measured on
CALIBRATION_WINDOWS = 4
_NUCLEAR_STAINS = re.compile(r"dapi|hoechst|nuc|draq|sytox|hematox", re.IGNORECASE)


# The scale a count chooses by itself (diameter_px, `cellseg count` without --diameter): decide_scale.
DEFAULT_SCALE = "default"
NATIVE_WITHIN = 0.1       # a given or pixel-size scale within 10 % of 1: native (resampling would gain nothing)
# A measured size from 1/1.2 to 1.1 times the model's: native. A measurement is a sample (the busiest tiles' nuclei)
# and depends on the scale measured at (the smallest nuclei are found only once enlarged); the example mosaic's count
# moves 1-2 % within 20 % (docs/pipeline.md, Scale). Above the model's size a median reads low (nuclei larger than the
# network learnt are split or missed: the mosaic at 2x, nuclei of ~35 px, reads 22.6 px), so a first read above it is
# measured again smaller (LARGE_PROBE, _measure_large), and the band for that measurement is narrower.
MEASURED_WITHIN = 0.2     # below the model's size
MEASURED_ABOVE = 0.1      # above it
MEASURE_ROUNDS = 2        # measured again, resampled, at most this often (measured_scale)
LARGE_PROBE = 0.5         # a median above the model's size is measured again at this share of the size it implies
# The measured nucleus size and the one the pixel size implies disagree when one is more than 1.5x the other: single
# 40x TNBC fields' medians lie within 0.81-1.42x of their training median at one pixel size, and a wrong magnification
# (20x for 40x) is 2x.
SCALE_MISMATCH = 1.5
MEASURE_TILES = 6         # tiles whose nuclei are measured (the busiest), at a time
MEASURE_NUCLEI = 400      # more tiles measured until this many nuclei are, up to MEASURE_TILES_MAX tiles
MEASURE_TILES_MAX = 24
MIN_MEASURED = 10         # fewer nuclei than this found there: no measurement
FACTOR_RANGE = (1 / 8, 4)  # how far a slide is resampled at most (network px per slide px)
UNRELIABLE_MPP = ("image-dpi",)   # SlideInfo.mpp_source: a PNG/JPEG's dpi, seldom a microscope's pixel size
# The median nucleus of a slide lies within this many µm across (lymphocytes ~5, cultured cell lines ~10-20): a
# pixel size that puts it outside is wrong, most likely by a power of ten (a 10x objective recorded for a 100x one).
# The one check of a pixel size where the model has no scale in µm for the modality (fluorescence: DSB2018 and
# Kromp record none), whose µm columns are in it all the same.
PLAUSIBLE_NUCLEUS_UM = (3.0, 35.0)


@dataclass(frozen=True)
class Scale:
    """How the slide is resampled for the network: `factor` network px per slide px, and why (`source`).

    method: what decided it: "--diameter", "pixel size" (the slide's, with the model's scale in µm), "measured"
    (the nuclei of the slide's busiest tiles), "protocol" (its nucleus_diameter_um) or "native" (nothing to go
    by); "" in a plan journaled before it was recorded. measured_diameter_px / measured_nuclei: the median nucleus
    measured on the slide (slide px) and how many; pixel_size_diameter_px: the nucleus size the pixel size implies
    (slide px); warning: the two disagree by more than SCALE_MISMATCH (which was used is in `source`)."""

    factor: float
    source: str
    model_diameter_px: float | None = None
    image_diameter_px: float | None = None
    method: str = ""
    measured_diameter_px: float | None = None
    measured_nuclei: int | None = None
    pixel_size_diameter_px: float | None = None
    warning: str | None = None


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
    _look: Look | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def look(self, height: int, width: int) -> Look:
        """What the slide (`height` x `width` level-0 px) looks like, fluorescence or brightfield
        (planning/modality.py), from the thumbnail's tissue in the model channel, as its intensity was measured.
        Worked out once: the count warns with it when planning and records it in the summary."""
        if self._look is None:
            on_tissue = tissue_pixels(select_channels(self.thumbnail, self.network.channel), self.tissue, height, width)
            self._look = slide_look(on_tissue, colour=not self.network.gray)
        return self._look

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
        stains = stains_apply(modality, info.n_channels)
        return CellExpansion(self.cell_expansion_px, context_rows(self.cell_expansion_px, self.tile_px, self.halo_px),
                             (info.height, info.width), self.tissue, info.mpp, list(self.channel_names), stains,
                             self.stain_white(info) if stains else None)

    def stain_white(self, info: SlideInfo) -> float | None:
        """The light level this slide's optical densities are taken against (cells.stain_white: a 16-bit slide's
        by the bits its brightest pixels use)."""
        return stain_white(info.dtype, self.network.intensity.high)


def plan_slide(slide: Slide, protocol: Protocol, detector: TileDetector, tissue: TissueFinder, timer: StageTimer,
               model_diameter_px: float | None = None, diameter_px: float | str | None = None,
               regions: RegionFile | None = None, micron_scale: MicronScale | None = None,
               calibration: Calibration | None = None) -> SlidePlan:
    """Decide everything about `slide` before detection (the detector runs here only to measure the nuclei).

    model_diameter_px: the bundle's training nucleus size; micron_scale: its scale in µm for the protocol's modality
    (Bundle.micron_scale), if any. diameter_px: this image's (--diameter); "auto" to measure it on a few tiles first
    (measure_diameter); DEFAULT_SCALE for the scale `cellseg count` chooses by itself (decide_scale: the pixel size,
    checked against the measured nuclei, else the measured nuclei); "native" for none; None: the protocol's
    nucleus_diameter_um at the slide's pixel size, else native (nothing measured). regions: count only there
    (planning/regions.py). calibration: where the detector calibrated while measuring, and the tiles it detected,
    are kept for the count (Calibration).
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
        _, intensity, gray = tissue_input(thumbnail, channel, tissue_mask, info.height, info.width)
    luminance = select_channels(thumbnail, channel).astype(np.float32).mean(-1)
    model_diameter_px = network_nucleus_px(protocol, model_diameter_px)
    if diameter_px in ("auto", DEFAULT_SCALE):
        native = NetworkInput(channel, intensity, gray=gray)
        calibration = calibration if calibration is not None else Calibration()

        def measure(factor: float) -> tuple[float, int] | None:
            return measure_diameter(slide, detector, dataclasses.replace(native, scale=Scale(factor, "")), protocol,
                                    thumbnail, thumb_factor, tissue_mask, calibration=calibration)
        with timer("scale"):
            scale = decide_scale(model_diameter_px, micron_scale, protocol, info, measure, auto=diameter_px == "auto")
    elif diameter_px == "native":
        scale = Scale(1.0, "native: --diameter native", model_diameter_px or None, method="native")
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


@dataclass
class Calibration:
    """A detector calibrated for one slide's network input on its normalisation windows (calibrate), made once, and
    the tiles it detected that no count has taken yet.

    Planning measures the nuclei of a few tiles (measure_diameter) with the detector calibrated as a count at that
    scale calibrates it: when the plan keeps that scale, the count takes those tiles' detections (take) instead of
    detecting them again, so that measuring costs next to nothing then. A Dask worker keeps one for its detector,
    across the tasks of a slide (run/distributed.py)."""

    holds: tuple | None = None
    detector: TileDetector | None = None
    detected: dict[TileSpec, TileDetections] = dataclasses.field(default_factory=dict)

    def calibrated(self, detector: TileDetector, slide: Slide, windows: list[Box],
                   network: NetworkInput) -> TileDetector:
        """`detector` calibrated on `windows` of `slide` for `network` (the same as last time when nothing changed;
        the scale's reason is no change)."""
        holds = (id(detector), str(slide.info.path), tuple(windows), network.channel, network.intensity,
                 network.scale.factor, network.gray)
        if self.holds != holds:
            self.detector = calibrate(detector, slide, windows, network)
            self.holds, self.detected = holds, {}
        return self.detector

    def detect(self, detector: TileDetector, slide: Slide, windows: list[Box], network: NetworkInput,
               tiles: list[TileSpec]) -> dict[TileSpec, TileDetections]:
        """Each of `tiles` detected with `detector` calibrated (calibrated), kept for `take`."""
        calibrated = self.calibrated(detector, slide, windows, network)
        todo = [t for t in tiles if t not in self.detected]
        if todo:
            found = calibrated.detect([network.read(slide, t.read) for t in todo], todo, network.scale.factor)
            self.detected.update(zip(todo, found))
        return {t: self.detected[t] for t in tiles}

    def take(self, tiles: list[TileSpec]) -> dict[TileSpec, TileDetections]:
        """The detections of those of `tiles` detected already by the detector as calibrated now, each handed over
        once."""
        return {t: self.detected.pop(t) for t in tiles if t in self.detected}


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
        if protocol.channel not in (None, 0):     # as select_channels refuses a channel a colour image lacks
            raise ParameterError(f"expected channel 0 (or none) for this 1-channel image, got {protocol.channel} "
                                 f"(--channel, or the protocol's [input] channel)")
        return 0
    if protocol.channel is not None:
        return protocol.channel
    for k, name in enumerate(info.channel_names or ()):
        if name and _NUCLEAR_STAINS.search(name):
            return k
    return None if info.n_channels == 3 else 0


def network_nucleus_px(protocol: Protocol, model_diameter_px: float | None) -> float | None:
    """The nucleus size (px) a count brings a slide's nuclei to: the protocol's network_nucleus_px when it sets one,
    else the model's training size (its bundle's nucleus_diameter_px). The scale's decisions below take it as "the
    model's size"."""
    return protocol.network_nucleus_px if protocol.network_nucleus_px is not None else model_diameter_px


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
                     model_diameter_px or None, method="native")
    if not model_diameter_px:
        return Scale(1.0, "native: the model bundle records no training nucleus size", None, image_d, method="native")
    factor = model_diameter_px / image_d
    if not 1 / 8 <= factor <= 4:
        raise ParameterError(f"expected a nucleus diameter within 1/4 to 8 times the model's "
                             f"{model_diameter_px:.1f} px, got {image_d:.1f} px ({source})")
    method = "--diameter" if diameter_px is not None else "protocol"
    if abs(factor - 1) < NATIVE_WITHIN:   # within 10 %: resampling would cost time and gain nothing
        return Scale(1.0, f"native: {source} is within 10 % of the model's size", model_diameter_px, image_d,
                     method=method)
    return Scale(factor, source, model_diameter_px, image_d, method=method)


def decide_scale(model_diameter_px: float | None, micron_scale: MicronScale | None, protocol: Protocol,
                 info: SlideInfo, measure: Callable[[float], tuple[float, int] | None], auto: bool = False) -> Scale:
    """The scale of a count given no --diameter (auto: given --diameter auto), so that a slide's nuclei reach the
    network at the same size whatever the scanner's magnification.

    With a pixel size to go by (pixel_size_diameter: the slide's, not a guess, and the model's scale in µm for the
    protocol's modality or the protocol's nucleus_diameter_um), the slide is resampled to the size it implies, once
    checked: the nuclei of the busiest tiles are measured at the slide's own scale (measure(1.0)), and when their median
    and the size the pixel size implies disagree by more than SCALE_MISMATCH they are measured again nearer the model's
    size (measured_scale: a first read far from it is biased); when that measurement disagrees too (a wrong pixel size
    in the metadata is common) the measured size is used and the scale's `warning` says so. Without one, or with
    --diameter auto, the measured size decides (measured_scale); with too few nuclei to measure, native.

    measure(factor): (median nucleus diameter in slide px, number of nuclei) found with the slide resampled by
    `factor` network px per slide px (measure_diameter), or None when too few.
    """
    if not model_diameter_px:
        return Scale(1.0, "native: the model bundle records no training nucleus size", method="native")
    implied = "--diameter auto" if auto else pixel_size_diameter(micron_scale, protocol, info, model_diameter_px)
    measured = measure(1.0)
    warning = None
    expected = None
    if not isinstance(implied, str):
        expected, target, how = implied
        factor = target / expected
        pixel = (Scale(1.0, f"native: {how}, within 10 % of the model's scale", model_diameter_px, expected,
                       method="pixel size", pixel_size_diameter_px=expected)
                 if abs(factor - 1) < NATIVE_WITHIN else
                 Scale(factor, f"{how}: resampled by {factor:.3g}", model_diameter_px, expected,
                       method="pixel size", pixel_size_diameter_px=expected))
        if measured is None:
            return dataclasses.replace(pixel, source=f"{pixel.source}; not checked: fewer than {MIN_MEASURED} "
                                                     f"nuclei found to measure")
        ratio = measured[0] / expected
        if 1 / SCALE_MISMATCH <= ratio <= SCALE_MISMATCH:
            return dataclasses.replace(pixel, measured_diameter_px=measured[0], measured_nuclei=measured[1],
                                       source=f"{pixel.source}; checked: {measured[1]} nuclei of the busiest tiles "
                                              f"measure {measured[0]:.1f} px, {ratio:.2f}x the {expected:.1f} px "
                                              f"it implies")
        implied = f"the pixel size's {expected:.1f} px disagrees with it"
    if measured is None:
        return Scale(1.0, f"native: too few nuclei found to measure their size ({implied})", model_diameter_px,
                     method="native", pixel_size_diameter_px=expected, warning=warning)
    scale = measured_scale(model_diameter_px, measured, measure, implied)
    if expected is not None:
        # The first read is at the slide's own scale, biased where the nuclei are far from the model's size (a 10x
        # H&E slide's nuclei of ~7 px read 10.9): only the measurement the scale settled on can overrule the pixel size
        final = (scale.measured_diameter_px or measured[0], scale.measured_nuclei or measured[1])
        ratio = final[0] / expected
        if 1 / SCALE_MISMATCH <= ratio <= SCALE_MISMATCH:
            return dataclasses.replace(pixel, measured_diameter_px=final[0], measured_nuclei=final[1],
                                       source=f"{pixel.source}; checked: {measured[1]} nuclei of the busiest tiles "
                                              f"measure {measured[0]:.1f} px at the slide's own scale, measured "
                                              f"again nearer the model's size {final[1]} measure {final[0]:.1f} px, "
                                              f"{ratio:.2f}x the {expected:.1f} px it implies")
        warning = _mismatch_warning(info, expected, final)
    if warning is None and not auto:
        # a pixel size that would resample beyond FACTOR_RANGE sets no scale, but the µm columns are in it: one 10x
        # off (a wrong objective in the metadata) is said as one 2x off is, against the measurement the scale
        # settled on (nuclei far from the model's size read biased at first)
        beyond = _diameter_beyond_range(micron_scale, protocol, info, model_diameter_px)
        final = (scale.measured_diameter_px or measured[0], scale.measured_nuclei or measured[1])
        if beyond is not None and not 1 / SCALE_MISMATCH <= final[0] / beyond <= SCALE_MISMATCH:
            warning = _mismatch_warning(info, beyond, final)
    if warning is None and expected is None:
        warning = _implausible_size_warning(info, (scale.measured_diameter_px or measured[0],
                                                   scale.measured_nuclei or measured[1]))
    warnings = [w for w in (warning, scale.warning) if w]       # a wrong pixel size, nuclei beyond the range
    return dataclasses.replace(scale, pixel_size_diameter_px=expected, warning="; ".join(warnings) or None)


def _mismatch_warning(info: SlideInfo, expected: float, measured: tuple[float, int]) -> str:
    ratio = measured[0] / expected
    return (f"the pixel size {info.mpp:g} µm/px ({info.mpp_source}) implies nuclei of {expected:.1f} px, but "
            f"{measured[1]} nuclei of the busiest tiles measure {measured[0]:.1f} px ({ratio:.2g}x, beyond "
            f"the {SCALE_MISMATCH:g}x nuclei vary by): the measured size set the scale. Check the pixel size "
            f"(--mpp); --diameter N overrides both")


def _implausible_size_warning(info: SlideInfo, measured: tuple[float, int]) -> str | None:
    """Where no nucleus size in µm checks the pixel size: a warning when it makes the measured median nucleus
    implausible (PLAUSIBLE_NUCLEUS_UM), else None."""
    if info.mpp is None or info.mpp_source.split(":")[0] in UNRELIABLE_MPP:
        return None
    um = measured[0] * info.mpp
    low, high = PLAUSIBLE_NUCLEUS_UM
    if low <= um <= high:
        return None
    return (f"the pixel size {info.mpp:g} µm/px ({info.mpp_source}) makes the median nucleus {um:.3g} µm across "
            f"({measured[1]} nuclei of the busiest tiles measure {measured[0]:.1f} px), where nuclei are "
            f"{low:g}-{high:g} µm: the µm columns are likely off (by 10x?). Check the pixel size (--mpp)")


def _diameter_beyond_range(micron_scale: MicronScale | None, protocol: Protocol, info: SlideInfo,
                           model_diameter_px: float) -> float | None:
    """The nucleus diameter (slide px) a usable pixel size implies when pixel_size_diameter refused it only for
    resampling beyond FACTOR_RANGE; None otherwise."""
    if info.mpp is None or info.mpp_source.split(":")[0] in UNRELIABLE_MPP:
        return None
    basis = _micron_basis(micron_scale, protocol, model_diameter_px)
    return None if isinstance(basis, str) else basis[0] / info.mpp


def _micron_basis(micron_scale: MicronScale | None, protocol: Protocol,
                  model_diameter_px: float) -> tuple[float, float, str] | str:
    """(the nucleus diameter in µm, the network px it should reach, how), or why there is none: the protocol's
    nucleus_diameter_um (at the model's size), else the model's scale in µm for the protocol's modality."""
    if protocol.nucleus_diameter_um is not None:
        return (protocol.nucleus_diameter_um, model_diameter_px,
                f"protocol nucleus_diameter_um {protocol.nucleus_diameter_um:g} µm")
    if micron_scale is not None:
        return (micron_scale.nucleus_diameter_um, network_nucleus_px(protocol, micron_scale.nucleus_diameter_px),
                f"the {micron_scale.mpp:g} µm/px of the model's {protocol.modality} training images")
    return f"the model has no scale in µm for {protocol.modality} (its training images had no pixel size)"


def pixel_size_diameter(micron_scale: MicronScale | None, protocol: Protocol, info: SlideInfo,
                        model_diameter_px: float) -> tuple[float, float, str] | str:
    """The nucleus diameter the slide's pixel size implies (slide px), the size the network should see it at
    (network px) and how, or why the pixel size cannot set the scale.

    The protocol's nucleus_diameter_um when it gives one (at the model's nucleus_diameter_px), else the model's scale
    in µm for the protocol's modality (MicronScale: resampled to the pixel size its training images had). A pixel size
    that is a guess (UNRELIABLE_MPP: a PNG/JPEG's dpi) or would resample beyond FACTOR_RANGE is not used; screen
    defaults (72 dpi, a TIFF resolution of 1) never become a pixel size (slides: SCREEN_MPP_UM)."""
    basis = _micron_basis(micron_scale, protocol, model_diameter_px)
    if isinstance(basis, str):
        return basis
    um, target, how = basis
    if info.mpp is None:
        return "the slide has no pixel size"
    if info.mpp_source.split(":")[0] in UNRELIABLE_MPP:
        return f"the pixel size comes from the image's {info.mpp_source}, seldom a microscope's"
    expected = um / info.mpp
    if not FACTOR_RANGE[0] <= target / expected <= FACTOR_RANGE[1]:
        return (f"the pixel size {info.mpp:g} µm/px would resample by {target / expected:.3g}, beyond "
                f"{FACTOR_RANGE[0]:g}-{FACTOR_RANGE[1]:g}")
    return expected, target, f"pixel size {info.mpp:g} µm/px ({info.mpp_source}) and {how}"


def measured_scale(model_diameter_px: float, measured: tuple[float, int],
                   measure: Callable[[float], tuple[float, int] | None], why: str) -> Scale:
    """The scale the nuclei measured at the slide's own scale (`measured`: median diameter in slide px, count) call
    for: native when the network sees them near the model's size (_measured_native); else the slide is resampled and
    measured again there (measure(factor)), up to MEASURE_ROUNDS times, until it does.

    A measurement far from the model's size is biased (the smallest nuclei are missed, the largest split), so the
    first one alone would resample a slide at 20x and the same at 40x differently; measured again nearer the model's
    size, both end where the nuclei the network finds have its size, whatever the magnification. A median above the
    model's size is measured again at LARGE_PROBE of the size it implies (_measure_large), not at it."""
    diameter, n = measured
    how = f"measured: {n} nuclei of the busiest tiles, median {diameter:.1f} px ({why})"
    if diameter > model_diameter_px:
        probed = _measure_large(model_diameter_px, diameter, measure)
        if probed is not None:
            probe, (diameter, n) = probed
            how += (f"; above the model's {model_diameter_px:.1f} px, so measured again resampled by {probe:.3g}: "
                    f"{n} nuclei, median {diameter:.1f} px")
            if _measured_native(model_diameter_px / diameter):
                return Scale(1.0, f"native: {how}, within 1/1.2-1.1x the model's size", model_diameter_px, diameter,
                             method="measured", measured_diameter_px=diameter, measured_nuclei=n)
            factor = _in_range(model_diameter_px / diameter)
            return Scale(factor, f"{how}: resampled by {factor:.3g}", model_diameter_px, diameter, method="measured",
                         measured_diameter_px=diameter, measured_nuclei=n,
                         warning=_beyond_range_warning(model_diameter_px, diameter, factor))
    if _measured_native(model_diameter_px / diameter):
        return Scale(1.0, f"native: {how}, within 1/1.2-1.1x the model's {model_diameter_px:.1f} px",
                     model_diameter_px, diameter, method="measured", measured_diameter_px=diameter, measured_nuclei=n)
    factor, decided_by = _in_range(model_diameter_px / diameter), diameter    # the size the factor is for
    for _ in range(MEASURE_ROUNDS):
        again = measure(factor)
        if again is None:
            break
        diameter, n = again
        how += f"; resampled by {factor:.3g}, {n} nuclei measure {diameter * factor:.1f} px"
        if _measured_native(model_diameter_px / (diameter * factor)):
            break
        factor, decided_by = _in_range(model_diameter_px / diameter), diameter
    return Scale(factor, f"{how}: resampled by {factor:.3g}", model_diameter_px, decided_by, method="measured",
                 measured_diameter_px=diameter, measured_nuclei=n,
                 warning=_beyond_range_warning(model_diameter_px, decided_by, factor))


def _beyond_range_warning(model_diameter_px: float, diameter: float, factor: float) -> str | None:
    """What a count must say when the nuclei measured (`diameter` slide px) would need resampling beyond FACTOR_RANGE
    to reach the model's size, and `factor` (the range's end) leaves them far from it: the count then misses and
    merges nuclei (the fluorescence mosaic at 2 µm/px, nuclei of 3.4 px: 210 cells for 447, median area 2.7x)."""
    wanted = model_diameter_px / diameter
    if FACTOR_RANGE[0] <= wanted <= FACTOR_RANGE[1]:
        return None
    return (f"the nuclei measure {diameter:.1f} px: bringing them to the model's {model_diameter_px:.1f} px would take "
            f"resampling by {wanted:.3g}, beyond the {FACTOR_RANGE[0]:g}-{FACTOR_RANGE[1]:g} a count goes to, so they "
            f"reach the network at {diameter * factor:.1f} px and the count and areas are not to be trusted: "
            f"scan at a {'higher' if wanted > 1 else 'lower'} magnification")


def _measure_large(model_diameter_px: float, diameter: float,
                   measure: Callable[[float], tuple[float, int] | None]) -> tuple[float, tuple[float, int]] | None:
    """Nuclei whose median reads `diameter` slide px, above the model's size, measured again where the network reads
    them faithfully: (the factor, the measurement), or None when too few are found there.

    Nuclei larger than the network learnt are split or missed, so their median reads toward its size whatever their
    own (the example mosaic at 2x: ~35 px read as 22.6-24.6 px, and still as 19.5-22 px once resampled by 0.75-0.85),
    while nuclei smaller than its size read within ~10 % down to half of it (the mosaic at 1x resampled by 0.64: 16.2
    px for 17.6). Resampled to LARGE_PROBE of the size the first read implies, nuclei up to 1/LARGE_PROBE times larger
    than read reach the network no larger than its size."""
    probe = _in_range(LARGE_PROBE * model_diameter_px / diameter)
    again = measure(probe)
    return None if again is None else (probe, again)


def _measured_native(ratio: float) -> bool:
    """Whether nuclei measured at model size / `ratio` are close enough to the model's (MEASURED_WITHIN below it,
    MEASURED_ABOVE above it)."""
    return 1 / (1 + MEASURED_ABOVE) < ratio < 1 + MEASURED_WITHIN


def _in_range(factor: float) -> float:
    return min(max(factor, FACTOR_RANGE[0]), FACTOR_RANGE[1])


def tile_geometry(protocol: Protocol, scale: Scale) -> tuple[int, int]:
    """Tile core and halo in slide px, so that the network still sees tile_size x tile_size at `scale`."""
    tile_px = max(16, round(protocol.tile_size / scale.factor))
    return tile_px, min(math.ceil(protocol.halo_px / scale.factor), tile_px // 2)


def measure_diameter(slide: Slide, detector: TileDetector, network: NetworkInput, protocol: Protocol,
                     thumbnail: np.ndarray, thumb_factor: float, tissue: TissueMask | None = None,
                     n_tiles: int = MEASURE_TILES, calibration: Calibration | None = None) -> tuple[float, int] | None:
    """Median equivalent diameter (slide px) of the nuclei found on the slide's busiest tiles with `network`, the
    slide's network input at the scale to measure at (network.scale).

    The tiles are those a count at that scale detects (tile_geometry) and analyses (tissue enough: none on a slide
    without tissue), ranked by thumbnail contrast times tissue share so that glass and empty background are not
    sampled; a nucleus counts in the tile whose core holds its centroid, so none counts twice and none cut by a read
    edge. The detector is calibrated on the windows a count at that scale is,
    and its detections stay in `calibration` (Calibration): a count at this network input takes them rather than
    detecting these tiles again. Returns (diameter, number of nuclei), or None when fewer than MIN_MEASURED were found.
    """
    info = slide.info
    tiles = plan_tiles(info.height, info.width, *tile_geometry(protocol, network.scale))
    luminance = select_channels(thumbnail, network.channel).astype(np.float32).mean(-1)

    share = {t.index: tissue.box_fraction(t.core) if tissue is not None and tissue.method != "none" else 1.0
             for t in tiles}
    tiles = [t for t in tiles if share[t.index] >= protocol.min_tissue_fraction and share[t.index] > 0]
    if not tiles:
        return None

    def busy(t: TileSpec) -> float:
        return thumbnail_contrast(luminance, t.core, thumb_factor) * share[t.index]

    ranked = sorted(tiles, key=lambda t: (-busy(t), t.index))
    windows = calibration_windows(info.height, info.width,
                                  max(16, round(CALIBRATION_WINDOW_PX / network.scale.factor)), luminance,
                                  thumb_factor, tissue)
    calibration = calibration if calibration is not None else Calibration()
    diameters: list[float] = []
    taken = 0
    # n_tiles at a time until the sample holds MEASURE_NUCLEI: a fixed number of tiles would cover 4x less of the
    # slide at 2x the magnification, its busiest corner, whose nuclei are not the slide's
    while taken < min(len(ranked), MEASURE_TILES_MAX) and (taken == 0 or len(diameters) < MEASURE_NUCLEI):
        chosen = sorted(ranked[taken:min(taken + n_tiles, MEASURE_TILES_MAX)], key=lambda t: t.index)
        taken += len(chosen)
        detected = calibration.detect(detector, slide, windows, network, chosen)
        for tile in chosen:
            det, core, read = detected[tile], tile.core, tile.read
            for box, mask in zip(det.boxes, det.masks):
                rows, cols = np.nonzero(mask)
                if rows.size and core.row0 <= read.row0 + box[0] + rows.mean() < core.row1 \
                        and core.col0 <= read.col0 + box[1] + cols.mean() < core.col1:
                    diameters.append(2 * math.sqrt(rows.size / math.pi))
    if len(diameters) < MIN_MEASURED:
        return None
    return float(np.median(diameters)), len(diameters)


def thumbnail_contrast(gray_thumbnail: np.ndarray, box: Box, thumb_factor: float) -> float:
    """Standard deviation of the thumbnail over `box` (level-0 px): high where cells are, ~0 on glass. A float
    slide's NaN or infinite pixels (a registered image's padding, a ratio's division by zero) are left out: they
    would make the box's contrast NaN, which ranks anywhere."""
    r0, c0 = int(box.row0 / thumb_factor), int(box.col0 / thumb_factor)
    r1, c1 = max(int(box.row1 / thumb_factor), r0 + 1), max(int(box.col1 / thumb_factor), c0 + 1)
    values = gray_thumbnail[r0:r1, c0:c1]
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = values[np.isfinite(values)]
    return float(values.std()) if values.size else 0.0


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


def tissue_input(thumbnail: np.ndarray, channel: int | None, tissue: TissueMask, height: int,
                 width: int) -> tuple[np.ndarray, IntensityRange, bool]:
    """The thumbnail's pixels on tissue in the model channel (tissue_pixels), the intensity range measured on them,
    and whether they reach the network without colour (intensity.gray_input)."""
    on_tissue = tissue_pixels(select_channels(thumbnail, channel), tissue, height, width)
    intensity = measure_range(on_tissue)
    # every k-th tissue pixel: a whole-slide thumbnail's millions say no more about colour than a million
    gray = gray_input(to_network_input(on_tissue[::max(1, len(on_tissue) >> 20)][None], intensity))
    return on_tissue, intensity, gray


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


"""Tissue prefilter: where on the slide is tissue (or, in fluorescence, cells), decided on a low-resolution view.

    slide -> view at ~8 µm/px (read_tissue_view) -> TissueMask by `unet` | `otsu` | `none`
          -> per tile: share of its core that is tissue; tiles below the protocol's minimum never reach the detector

- `unet`: the small U-Net bundle shipped in cellseg/models/tissue (see its card), trained on synthetic slide
  views for brightfield and fluorescence; it knows glass, dark field, dust and pen marks are not tissue.
- `otsu`: the classical fallback. A "signal" image (brightness in fluorescence; darkness plus colour
  saturation in brightfield, where tissue absorbs light on bright glass) split by Otsu's threshold. Otsu always
  splits, so on a slide with no tissue at all it still marks some background; a brightfield split is only
  accepted when the darker class absorbs at least a little light (`_MIN_BRIGHTFIELD_CONTRAST`).
- `none`: everything is tissue (the whole image is analysed).

Every mask is grown by `GROW_UM` so the nuclei on a tissue border stay in the tiles that are kept.
Coordinates: the mask's pixel [i, j] covers slide rows i*row_factor .. (i+1)*row_factor (level-0 px).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError
from ..geometry import Box
from .methods import METHODS

log = logging.getLogger(__name__)

VIEW_UM_PER_PX = 8.0        # resolution of the view tissue is judged on
ASSUMED_MPP = 0.5           # µm/px assumed when the slide has no pixel size (a 20x scan)
MIN_VIEW_SIDE = 64          # small images get a finer view, so the view is never a handful of pixels
# Bounds the tissue stage's memory for any slide (~0.5 GB transient at this side): a 100k x 100k slide at
# 0.25 µm/px is 3125 px at 8 µm/px; only slides over 65k px at 0.5 µm/px get a coarser view (12 µm/px at 100k).
MAX_VIEW_SIDE = 4096
GROW_UM = 16.0              # the mask is grown by about one or two nucleus diameters
_MIN_BRIGHTFIELD_CONTRAST = 0.03   # tissue absorbs >= 3 % of the glass's light, or is visibly coloured


@dataclass(frozen=True)
class TissueMask:
    """Tissue (True) on a (h, w) grid over the slide; `row_factor`/`col_factor` level-0 px per mask px."""

    mask: np.ndarray
    row_factor: float
    col_factor: float
    method: str
    note: str = ""
    view_um_per_px: float | None = None
    excluded_px: float = 0.0     # tissue in unreadable regions (without): not counted, so not in the area

    def area_px(self) -> float:
        """Tissue area in level-0 px (less any in unreadable regions)."""
        return float(self.mask.sum()) * self.row_factor * self.col_factor - self.excluded_px

    def box_fraction(self, box: Box) -> float:
        """Share of `box` (level-0 px) that is tissue; mask pixels the box only partly covers count fully."""
        r0, c0 = int(box.row0 // self.row_factor), int(box.col0 // self.col_factor)
        r1 = min(max(math.ceil(box.row1 / self.row_factor), r0 + 1), self.mask.shape[0])
        c1 = min(max(math.ceil(box.col1 / self.col_factor), c0 + 1), self.mask.shape[1])
        region = self.mask[r0:r1, c0:c1]
        return float(region.mean()) if region.size else 0.0

    def at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Tissue at level-0 pixel rows x cols (1-D integer arrays): bool (len(rows), len(cols))."""
        ri, ci = self._mask_index(rows, cols)
        # Each mask pixel covers many level-0 pixels: the mask pixels the runs of equal indices sample, repeated
        # (0.1 ms for a 512² tile at 16 px per mask pixel, against 0.75 ms for a gather of every pixel)
        (r_first, r_len), (c_first, c_len) = _runs(ri), _runs(ci)
        return self.mask[ri[r_first]][:, ci[c_first]].repeat(c_len, 1).repeat(r_len, 0)

    def constant(self, rows: np.ndarray, cols: np.ndarray) -> bool | None:
        """For level-0 pixel rows rows[0]..rows[-1] x cols[0]..cols[-1] (ascending): True (False) when every mask
        pixel `at` can sample in there is tissue (background), None when they differ. Costs a mask region, not a
        tile-sized array."""
        ri, ci = self._mask_index(rows, cols)
        region = self.mask[ri[0]:ri[-1] + 1, ci[0]:ci[-1] + 1]
        if region.all():
            return True
        return False if not region.any() else None

    def area_in(self, box: Box) -> float:
        """Tissue area (level-0 px) inside `box`: each mask pixel weighted by how much of it the box covers."""
        r0, c0 = int(box.row0 // self.row_factor), int(box.col0 // self.col_factor)
        r1 = min(math.ceil(box.row1 / self.row_factor), self.mask.shape[0])
        c1 = min(math.ceil(box.col1 / self.col_factor), self.mask.shape[1])
        rows, cols = np.arange(r0, r1), np.arange(c0, c1)
        weight_r = np.clip(np.minimum(box.row1, (rows + 1) * self.row_factor)
                           - np.maximum(box.row0, rows * self.row_factor), 0, None)
        weight_c = np.clip(np.minimum(box.col1, (cols + 1) * self.col_factor)
                           - np.maximum(box.col0, cols * self.col_factor), 0, None)
        return float(weight_r @ self.mask[r0:r1, c0:c1] @ weight_c)

    def without(self, boxes: list[Box]) -> TissueMask:
        """The same mask with the tissue inside `boxes` (disjoint, level-0 px: unreadable regions) taken off its
        area, exactly, whatever the mask's resolution (the picture of the mask is unchanged)."""
        if not boxes:
            return self
        note = f"{self.note}; " if self.note else ""
        return dataclasses.replace(self, excluded_px=self.excluded_px + sum(self.area_in(b) for b in boxes),
                                   note=f"{note}{len(boxes)} unreadable region(s) left out")

    def _mask_index(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mask rows and columns holding level-0 pixel rows and cols."""
        ri = np.minimum((np.asarray(rows) // self.row_factor).astype(np.int64), self.mask.shape[0] - 1)
        ci = np.minimum((np.asarray(cols) // self.col_factor).astype(np.int64), self.mask.shape[1] - 1)
        return ri, ci


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each run of equal consecutive values starts, and its length."""
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]]) if len(values) else np.zeros(0, np.int64)
    return starts, np.diff(np.r_[starts, len(values)])


def view_side(height: int, width: int, mpp: float | None, um_per_px: float = VIEW_UM_PER_PX) -> int:
    """Longer side (px) of the tissue view: about `um_per_px`, at least MIN_VIEW_SIDE, at most the slide."""
    longer = max(height, width)
    side = math.ceil(longer * (mpp or ASSUMED_MPP) / um_per_px)
    return int(min(longer, MAX_VIEW_SIDE, max(side, MIN_VIEW_SIDE)))


def read_tissue_view(slide, um_per_px: float = VIEW_UM_PER_PX) -> tuple[np.ndarray, float, float, float]:
    """(view (h, w, C) native dtype, row_factor, col_factor, µm per view px) from a pyramid level or block mean."""
    info = slide.info
    view, _ = slide.read_thumbnail(view_side(info.height, info.width, info.mpp, um_per_px))
    row_factor, col_factor = info.height / view.shape[0], info.width / view.shape[1]
    return view, row_factor, col_factor, (info.mpp or ASSUMED_MPP) * max(row_factor, col_factor)


def signal_image(view: np.ndarray, modality: str) -> np.ndarray:
    """(h, w) float where tissue is high, from a lightly smoothed view.

    Fluorescence: brightness, scaled by its 0.5..99.5 percentile range. Brightfield: the share of light absorbed
    relative to the glass, in the channel that absorbs most (1 - x_c / glass_c, glass_c = the 99th percentile
    of channel c), so a tinted glass is not tissue and a stain that absorbs only one colour is.
    """
    from skimage.filters import gaussian
    x = gaussian(view.astype(np.float32), sigma=1.0, channel_axis=-1, preserve_range=True)
    if modality == "fluorescence":
        x = x.max(axis=-1)
        lo, hi = np.percentile(x, [0.5, 99.5])
        return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    glass = np.maximum(np.percentile(x.reshape(-1, x.shape[-1]), 99, axis=0), 1e-6)
    return np.clip(1 - x / glass, 0, 1).max(axis=-1)


def otsu_tissue(view: np.ndarray, modality: str) -> tuple[np.ndarray, str]:
    from skimage.filters import threshold_otsu
    signal = signal_image(view, modality)
    if np.ptp(signal) < 1e-6:
        return np.zeros(signal.shape, bool), "uniform image: no tissue"
    threshold = threshold_otsu(signal)
    if modality == "brightfield" and float(np.median(signal[signal > threshold])) < _MIN_BRIGHTFIELD_CONTRAST:
        return np.zeros(signal.shape, bool), (f"no tissue: nothing absorbs {_MIN_BRIGHTFIELD_CONTRAST:.0%} "
                                              f"of the light the glass lets through")
    what = "brightness" if modality == "fluorescence" else "absorbance relative to the glass"
    return signal > threshold, f"otsu threshold {threshold:.3f} on {what}"


def grow(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0 or not mask.any():
        return mask
    from scipy import ndimage
    return ndimage.binary_dilation(mask, structure=disk(px))


def disk(radius: int) -> np.ndarray:
    """The pixels within `radius` of the centre, as skimage.morphology.disk draws them: importing that module costs
    ~0.3 s, on the path to the first tile."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2


class TissueFinder:
    """Finds tissue on slides with one method; holds the U-Net (loaded once) for `unet`."""

    def __init__(self, method: str, bundle: str | None = None, device: str = "cpu"):
        """device: where the U-Net runs (the detector's: on a GPU machine a 40k² slide's view costs ~12 s of CPU)."""
        if method not in METHODS:
            raise ParameterError(f"expected a tissue method among {', '.join(METHODS)}, got {method!r}")
        self.method = method
        self.bundle = None
        self._net = None
        if method == "unet":
            from .unet import for_inference, load_tissue_bundle
            self.bundle = load_tissue_bundle(bundle)
            self._net = for_inference(self.bundle.build(), device)

    @property
    def um_per_px(self) -> float:
        return self.bundle.view_um_per_px if self.bundle is not None else VIEW_UM_PER_PX

    def describe(self) -> dict:
        out = {"method": self.method}
        if self.bundle is not None:
            out.update(bundle=self.bundle.name, path=str(self.bundle.path), weights_sha256=self.bundle.weights_sha256)
        return out

    def find(self, slide, modality: str) -> TissueMask:
        info = slide.info
        if self.method == "none":
            return TissueMask(np.ones((1, 1), bool), float(info.height), float(info.width), "none",
                              "none: the whole image is analysed")
        view, row_factor, col_factor, view_um = read_tissue_view(slide, self.um_per_px)
        if self.method == "unet":
            from .unet import predict_tissue
            mask = predict_tissue(self._net, view) >= self.bundle.threshold
            note = f"unet {self.bundle.name} at {view_um:.2g} µm/px, threshold {self.bundle.threshold:g}"
        else:
            mask, note = otsu_tissue(view, modality)
            note = f"{note} at {view_um:.2g} µm/px"
        grow_px = max(1, round(GROW_UM / view_um)) if mask.any() else 0
        mask = grow(mask, grow_px)
        if info.mpp is None:
            note += f" (no pixel size: {ASSUMED_MPP} µm/px assumed for the view)"
        log.info("tissue (%s): %.1f %% of %d x %d view; %s", self.method, 100 * mask.mean(), *mask.shape, note)
        return TissueMask(mask, row_factor, col_factor, self.method, note, view_um)


def write_tissue_png(tissue: TissueMask, path) -> None:
    """The mask as an 8-bit PNG (255 = tissue) at view resolution; napari scales it onto the slide."""
    from PIL import Image
    Image.fromarray(np.where(tissue.mask, 255, 0).astype(np.uint8)).save(path)

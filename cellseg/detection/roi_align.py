"""RoIAlign on a CPU as gathers and small matrix products: `MatrixMultiScaleRoIAlign`.

torchvision's CPU RoIAlign kernel loops over RoIs, channels and bins one float at a time, on one core; with cells'
RoIs it was ~15 % of the network's CPU time in fp32 and ~23 % in bf16 (benchmarks/network_ops.py). It computes
exactly this, for each RoI, bin (p, q) and channel:

    out[p, q] = 1 / (G * G) * sum over the G x G sample points of the bin of bilinear(feature, y, x)

and bilinear interpolation weights are a product of a y part and an x part (so is the kernel's "sample outside the
map counts zero" rule), so the whole RoI is two small matrix products over the crop of the map it covers:

    out[:, :, c] = Wy @ crop[:, :, c] @ Wx.T,   Wy: (pooled, crop height), Wx: (pooled, crop width)

where row p of Wy holds the y-weights of bin row p's G sample rows, each split between the two feature rows it
falls between. A nucleus's RoI covers a few feature pixels (median ~3 at stride 4 on the example mosaic), so the
crop is small: RoIs are grouped by the crop size they need, each group gathered from the NHWC features at once
(channels contiguous: the convolutions' own channels_last layout, no conversion) and multiplied in batches.
Same samples, same weights, same edge rules as the kernel (aligned=False, sampling_ratio > 0); only the order of
the sums differs (outputs within 2e-5 of torchvision's in the tests). On the example mosaic (Zen 4) RoIAlign's
share of the network's CPU time fell from 15 % to 5 % in fp32 and from 23 % to 7 % in bf16, with the same cells
(docs/performance.md).

Training uses it too: autograd runs back through the gathers and products (gradients within ~1e-5 of the kernel's,
the same losses), where torchvision's backward loops on one core: docs/training.md has the step times. GPUs and
adaptive sampling (sampling_ratio <= 0, whose sample count varies per RoI) keep torchvision's kernel.
"""

from __future__ import annotations

import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

# crop sizes (feature px, both axes) RoIs are grouped by: a RoI goes to the first that holds it
CROP_SIZES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
WORK_BYTES = 64 << 20


def _axis_samples(start: torch.Tensor, length: torch.Tensor, pooled: int, grid: int, size: int):
    """Along one axis, per RoI (K,): the (K, pooled, grid) sample points' lower and upper feature indices and
    their weights (each already divided by `grid`), as torchvision's kernel computes them (aligned=False)."""
    bin_size = (length / pooled)[:, None, None]
    bins = torch.arange(pooled, dtype=start.dtype)[None, :, None]
    steps = torch.arange(grid, dtype=start.dtype)[None, None, :]
    pos = start[:, None, None] + bins * bin_size + (steps + 0.5) * bin_size / grid
    inside = (pos >= -1.0) & (pos <= size)                      # a sample beyond -1 or `size` counts zero
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_end = low >= size - 1                                    # the last row/column: all weight on it
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, size - 1, low + 1)
    frac = torch.where(at_end, 0.0, pos - low)
    return low, high, (1 - frac) * inside / grid, frac * inside / grid


def _weight_matrix(low, high, w_low, w_high, first: torch.Tensor, span: int) -> torch.Tensor:
    """(K, pooled, span): each bin's weights over the `span` feature indices from `first` (K,)."""
    k, pooled, _ = low.shape
    weights = torch.zeros(k, pooled, span, dtype=w_low.dtype)
    weights.scatter_add_(2, low - first[:, None, None], w_low)
    weights.scatter_add_(2, high - first[:, None, None], w_high)
    return weights


def roi_align_rows(out: torch.Tensor, rows: torch.Tensor, features: torch.Tensor, rois: torch.Tensor,
                   spatial_scale: float, sampling_ratio: int) -> None:
    """RoIAlign (aligned=False) of `rois` (K, 5: image index, x0, y0, x1, y1 in input px) on `features` (N, C, H, W,
    fp32, best channels_last), written to `out` (M, P, Q, C: NHWC, any float dtype) at rows `rows` (K,)."""
    if sampling_ratio <= 0:
        raise ValueError(f"expected a fixed sampling ratio (> 0), got {sampling_ratio}")
    pooled_h, pooled_w = out.shape[1:3]
    n, c, h, w = features.shape
    nhwc = features.permute(0, 2, 3, 1)
    pixels = (nhwc if nhwc.is_contiguous() else nhwc.contiguous()).view(n * h * w, c)
    image = rois[:, 0].long()
    x0, y0, x1, y1 = (rois[:, j] * spatial_scale for j in range(1, 5))
    y_samples = _axis_samples(y0, (y1 - y0).clamp(min=1.0), pooled_h, sampling_ratio, h)
    x_samples = _axis_samples(x0, (x1 - x0).clamp(min=1.0), pooled_w, sampling_ratio, w)
    # samples increase along each axis: the crop runs from the first's lower index to the last's upper one
    need = torch.maximum(y_samples[1][:, -1, -1] - y_samples[0][:, 0, 0],
                         x_samples[1][:, -1, -1] - x_samples[0][:, 0, 0]) + 1
    out_rows = out.view(out.shape[0], -1)
    smaller = 0
    for size in (*(s for s in CROP_SIZES if s < max(h, w)), max(h, w)):
        group = torch.nonzero((need > smaller) & (need <= size)).flatten()
        smaller = size
        if len(group) == 0:
            continue
        span_h, span_w = min(size, h), min(size, w)
        # at most WORK_BYTES of crops and products at a time: flat memory however many large RoIs a tile proposes
        per_roi = (span_h * span_w + span_h * pooled_w + pooled_h * pooled_w) * c * features.element_size()
        per_chunk = max(1, WORK_BYTES // per_roi)
        for chunk in group.split(per_chunk):
            _pool_group(out_rows, rows[chunk], pixels, (h, w), image[chunk],
                        [t[chunk] for t in y_samples], [t[chunk] for t in x_samples], span_h, span_w)


def _pool_group(out_rows, rows, pixels, shape, image, y_samples, x_samples, span_h: int, span_w: int) -> None:
    """RoIAlign of RoIs whose samples lie within span_h x span_w feature pixels, into rows `rows` of `out_rows`."""
    h, w = shape
    m, c = len(rows), pixels.shape[1]
    pooled_w = x_samples[0].shape[1]
    first_y = y_samples[0][:, 0, 0].clamp(max=h - span_h)     # the crop stays inside the map
    first_x = x_samples[0][:, 0, 0].clamp(max=w - span_w)
    wy = _weight_matrix(*y_samples, first_y, span_h)
    wx = _weight_matrix(*x_samples, first_x, span_w)
    corner = image * (h * w) + first_y * w + first_x
    at = corner[:, None, None] + torch.arange(span_h)[None, :, None] * w + torch.arange(span_w)[None, None, :]
    crops = pixels.index_select(0, at.flatten()).view(m, span_h, span_w, c)
    across = torch.matmul(wx[:, None], crops)                                  # (m, span_h, Q, C)
    pooled = torch.bmm(wy, across.view(m, span_h, pooled_w * c))               # (m, P, Q * C)
    out_rows.index_copy_(0, rows, pooled.view(m, -1).to(out_rows.dtype))


class MatrixMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same levels, same level mapping, same state) that on a CPU pools with
    `roi_align_rows` and returns channels_last output; under bf16 autocast in bf16 (the heads after it cast their
    input to bf16 anyway: the same values, half the memory). GPUs and adaptive sampling go to torchvision's."""

    @classmethod
    def replacing(cls, pooler: MultiScaleRoIAlign) -> MatrixMultiScaleRoIAlign:
        matrix = cls(pooler.featmap_names, pooler.output_size, pooler.sampling_ratio,
                     canonical_scale=pooler.canonical_scale, canonical_level=pooler.canonical_level)
        matrix.scales, matrix.map_levels = pooler.scales, pooler.map_levels
        return matrix

    def forward(self, x, boxes, image_shapes):
        levels = [x[k] for k in self.featmap_names]
        if levels[0].device.type != "cpu" or self.sampling_ratio <= 0:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(levels, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        with torch.profiler.record_function("cellseg::roi_align"):    # benchmarks/network_ops.py groups by it
            return self._pool(levels, boxes)

    def _pool(self, levels, boxes):
        rois = _convert_to_roi_format([b.float() for b in boxes])
        level_of = self.map_levels(boxes)
        autocast = torch.is_autocast_enabled("cpu")
        out = torch.empty(len(rois), *self.output_size, levels[0].shape[1],
                          dtype=torch.get_autocast_dtype("cpu") if autocast else torch.float32)
        with torch.autocast("cpu", enabled=False):
            for level, (features, scale) in enumerate(zip(levels, self.scales)):
                rows = torch.nonzero(level_of == level).flatten()
                if len(rows):
                    roi_align_rows(out, rows, features.float(), rois[rows], scale, self.sampling_ratio)
        return out.permute(0, 3, 1, 2)


def matrix_roi_pools(model) -> None:
    """Give a Mask R-CNN's box and mask heads MatrixMultiScaleRoIAlign poolers (CPU models; same results)."""
    heads = model.roi_heads
    for name in ("box_roi_pool", "mask_roi_pool"):
        pooler = getattr(heads, name)
        if not isinstance(pooler, MatrixMultiScaleRoIAlign):
            setattr(heads, name, MatrixMultiScaleRoIAlign.replacing(pooler))

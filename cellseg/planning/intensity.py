"""Turn native slide pixels into the network's input: one channel or RGB, float32 (3, h, w) in ~[0, 1].

The intensity range is measured once per slide (on the thumbnail), never per tile, so a cell gets the
same input whatever tile it falls in — otherwise counts would depend on --tile-size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError


@dataclass(frozen=True)
class IntensityRange:
    low: float
    high: float


def select_channels(image: np.ndarray, channel: int | None) -> np.ndarray:
    """(h, w, C) -> (h, w, 1) for one chosen channel, or (h, w, 3) RGB when channel is None and C == 3.

    channel None with a grayscale image keeps it; with C not in {1, 3} the first channel is used.
    """
    n = image.shape[-1]
    if channel is not None:
        if not 0 <= channel < n:
            raise ParameterError(f"expected a channel between 0 and {n - 1} for this {n}-channel image, got {channel} "
                                 f"(--channel, or the protocol's [input] channel)")
        return image[..., channel:channel + 1]
    if n in (1, 3):
        return image
    return image[..., :1]


def measure_range(image: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.8) -> IntensityRange:
    """Percentile range over all pixels and channels (usually of a thumbnail); never a zero-width range."""
    values = np.asarray(image, dtype=np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return IntensityRange(0.0, 1.0)
    low, high = np.percentile(finite, [low_pct, high_pct])
    if high - low < 1e-6:
        high = low + max(abs(low) * 1e-3, 1e-3)
    return IntensityRange(float(low), float(high))


def to_network_input(image: np.ndarray, rng: IntensityRange) -> np.ndarray:
    """(h, w, 1 or 3) native pixels -> float32 (3, h, w) scaled so the range maps to [0, 1] (clipped)."""
    image = np.asarray(image)
    h, w, channels = image.shape
    if channels not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels (select_channels), got {channels}")
    # One plane at a time, in place: the same float32 arithmetic as (float32(x) - low) / (high - low) on the
    # whole (h, w, C) array, at a third of the time (no interleaved temporaries, no strided transpose at the end).
    out = np.empty((3, h, w), np.float32)
    for k in range(channels):
        plane = out[k]
        np.copyto(plane, image[..., k], casting="unsafe")
        plane -= rng.low
        plane /= rng.high - rng.low
        np.clip(plane, 0.0, 1.0, out=plane)
        if image.dtype.kind == "f":
            np.nan_to_num(plane, copy=False)
    if channels == 1:
        out[1] = out[0]
        out[2] = out[0]
    return out


def as_network_input(raw: np.ndarray, box_shape: tuple[int, int], channel: int | None, intensity: IntensityRange,
                     scale: float = 1.0) -> np.ndarray:
    """Native pixels (h, w, C) of a slide box of shape `box_shape` as the network sees them: the model channel,
    resampled by `scale` network px per slide px, normalised (to_network_input)."""
    pixels = select_channels(raw, channel)
    if scale != 1.0:
        shape = network_shape(box_shape, scale)
        pixels = enlarged(pixels, shape) if scale > 1 else _shrunk(pixels, shape)
    return to_network_input(pixels, intensity)


def network_shape(box_shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """(h, w) of the network input of a slide box of `box_shape` resampled by `scale` network px per slide px."""
    if scale == 1.0:
        return tuple(box_shape)
    return max(1, round(box_shape[0] * scale)), max(1, round(box_shape[1] * scale))


def network_input_on_device(pixels, shape: tuple[int, int], intensity: IntensityRange, scale: float = 1.0):
    """as_network_input for native pixels already on a torch device (a GPU): `pixels` (h, w, 1 or 3), the model
    channel or RGB (select_channels), any dtype torch converts to float32 as numpy does; `shape` the network input's
    (h', w'); `scale` >= 1 (enlarged by the same bicubic interpolation; shrinking stays on the host, with
    scikit-image's anti-aliasing). The same float32 arithmetic as the host's, so on a CPU the same values to the bit
    (tests/planning/test_intensity_device.py). Returns float32 (3, h', w') on the pixels' device."""
    import torch
    if scale < 1:
        raise ParameterError(f"expected a scale >= 1 for network input made on the device, got {scale}")
    planes = pixels.permute(2, 0, 1).float()
    if scale != 1.0:
        planes = torch.nn.functional.interpolate(planes[None], size=tuple(shape), mode="bicubic",
                                                 align_corners=False)[0]
    planes = ((planes - intensity.low) / (intensity.high - intensity.low)).clamp_(0.0, 1.0)
    if pixels.is_floating_point():
        planes = torch.nan_to_num(planes)
    return planes.expand(3, -1, -1).contiguous() if planes.shape[0] == 1 else planes


def enlarged(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w, C) pixels enlarged to `shape` by bicubic interpolation (torch's, pixel centres as skimage's resize):
    a slide coarser than the model's training images loses less of its nuclei's edges than with bilinear (the example
    mosaic at half size, AP50 0.726 -> 0.750; benchmarks/scale_check.py), at a quarter of skimage's bilinear time. The
    overshoot at edges is clipped by the normalisation that follows."""
    import torch
    planes = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(planes, size=shape, mode="bicubic", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def _shrunk(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from skimage.transform import resize
    return resize(pixels.astype(np.float32), shape, order=1, anti_aliasing=True, preserve_range=True)


# Mean distance of a pixel's three input planes from their mean, below which a slide's network input counts as gray.
# One channel gives 0, as does a gray image saved as RGB, JPEG (quality 75-95) included (< 1e-7); the least coloured
# held-out RGB images give 0.039 (DSB2018 stained tissue) and 0.032 (TNBC H&E), over the whole image.
GRAY_INPUT_CHROMA = 0.01


def gray_input(network_pixels: np.ndarray) -> bool:
    """Whether pixels as the network sees them, (3, ...) float (to_network_input), have no colour: one channel, or
    RGB planes alike (GRAY_INPUT_CHROMA). Such a slide gets its modality's gray score threshold."""
    if network_pixels.size == 0:
        return False
    return float(np.abs(network_pixels - network_pixels.mean(0)).mean()) < GRAY_INPUT_CHROMA

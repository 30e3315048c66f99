"""Training augmentation for what users bring: other stains, focus, noise, contrast and dim nuclei.

Applied to a training crop already in the network's input form (float32 (3, H, W) in ~[0, 1], see planning/intensity.py)
with its instance masks. Geometry (scale 0.5-2x, anisotropic zoom, flips, 90° rotations) is done by
training.sample_crop, and copy-paste of nuclei by training.copy_paste; this module changes pixel values only, so the
masks stay valid:

- H&E stain variation (colour images): jitter in HED space (colour deconvolution, skimage.color.rgb2hed), each
  stain's optical density scaled and shifted (Tellez et al., Med. Image Anal. 2019, "HED jitter").
- out-of-focus tissue: Gaussian blur; camera and scanner noise: additive Gaussian noise.
- contrast, gamma, brightness and per-channel gain.
- dim nuclei: some nuclei pulled towards the background level (weakly stained or out of the focal plane), the
  misses that make counts low on dense tissue sections.
- polarity: colour crops turned gray (dark nuclei on a light ground, as grayscale brightfield), and grayscale crops
  inverted (fluorescence's bright nuclei on a dark ground become dark ones on a light ground).

Every probability and range lives in `Augmentation`, recorded in the model card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Augmentation:
    scale: tuple[float, float] = (0.5, 2.0)         # zoom, log-uniform (training.sample_crop)
    hed_p: float = 0.8                              # colour images only
    hed_gain: float = 0.15                          # each stain's OD x U(1 - g, 1 + g)
    hed_shift: float = 0.05                         # + U(-s, s) x the stain's 99th percentile OD
    blur_p: float = 0.25
    blur_sigma: tuple[float, float] = (0.5, 2.0)
    noise_p: float = 0.25
    noise_std: tuple[float, float] = (0.005, 0.05)
    gamma: tuple[float, float] = (0.6, 1.6)         # log-uniform
    contrast: tuple[float, float] = (0.6, 1.4)
    brightness: float = 0.08
    channel_gain: float = 0.1                       # per-channel x U(1 - g, 1 + g)
    dim_p: float = 0.3
    dim_fraction: float = 0.35                      # share of the crop's nuclei dimmed
    dim_factor: tuple[float, float] = (0.25, 0.7)   # their contrast against the background x U(a, b)
    # Share of crops centred on a nucleus drawn at random (training.sample_crop): crops then land in proportion
    # to nuclei, so dense clusters (where the model misses touching nuclei) are seen more often than empty
    # background.
    nucleus_centred_p: float = 0.5
    # Colour crops turned to gray (luminance): grayscale brightfield (dark nuclei on a light ground) is held out
    # whole, so without this the model never sees a gray image whose nuclei are dark.
    gray_p: float = 0.15
    # Grayscale crops inverted (1 - x): in training data, fluorescence is nearly every gray image, so a gray image's
    # bright blobs are nuclei; on a grayscale brightfield smear that rule outlines the pale cytoplasm between dark
    # regions. Inverted fluorescence shows dark nuclei on a light ground instead. Off in the recipe: a held-out
    # comparison found more gray nuclei and as many more false positives (docs/training.md).
    invert_p: float = 0.0
    # Anisotropic zoom (training.sample_crop): with this probability rows and columns are zoomed by factors whose
    # ratio is log-uniform up to `aspect`, so round nuclei also appear elongated (the dense bands of elongated
    # nuclei the v3 model missed in stained tissue, issue 47). Off until a held-out comparison keeps it.
    aspect_p: float = 0.0
    aspect: float = 1.8
    # Copy-paste (training.copy_paste): with paste_p, U(paste_count) nuclei of the crop's own image pasted into it,
    # a share paste_touch_p against a nucleus already there (touching, clusters), a share paste_dim_p blended in at
    # alpha U(paste_dim_alpha) (dim or pale nuclei). Off until a held-out comparison keeps it.
    paste_p: float = 0.0
    paste_count: tuple[int, int] = (3, 15)
    paste_touch_p: float = 0.6
    paste_dim_p: float = 0.3
    paste_dim_alpha: tuple[float, float] = (0.3, 0.7)

    def describe(self) -> str:
        return (f"zoom {self.scale[0]}-{self.scale[1]}x, flips, 90° rotations; HED stain jitter (p {self.hed_p}, gain "
                f"±{self.hed_gain}, shift ±{self.hed_shift}); blur σ {self.blur_sigma[0]}-{self.blur_sigma[1]} px "
                f"(p {self.blur_p}); Gaussian noise σ {self.noise_std[0]}-{self.noise_std[1]} (p {self.noise_p}); gamma "
                f"{self.gamma[0]}-{self.gamma[1]}, contrast {self.contrast[0]}-{self.contrast[1]}, brightness "
                f"±{self.brightness}, per-channel gain ±{self.channel_gain}; {int(self.dim_fraction * 100)} % of nuclei "
                f"dimmed to {self.dim_factor[0]}-{self.dim_factor[1]} of their contrast (p {self.dim_p}); "
                f"{int(self.nucleus_centred_p * 100)} % of crops centred on a random nucleus; colour crops turned "
                f"gray (p {self.gray_p})"
                + (f"; grayscale crops inverted (p {self.invert_p})" if self.invert_p else "")
                + (f"; anisotropic zoom, row/column ratio up to {self.aspect}x (p {self.aspect_p})"
                   if self.aspect_p else "")
                + (f"; copy-paste of {self.paste_count[0]}-{self.paste_count[1]} nuclei of the same image (p "
                   f"{self.paste_p}; {int(self.paste_touch_p * 100)} % touching a nucleus, "
                   f"{int(self.paste_dim_p * 100)} % blended at alpha {self.paste_dim_alpha[0]}-"
                   f"{self.paste_dim_alpha[1]})" if self.paste_p else ""))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


NO_AUGMENTATION = Augmentation(scale=(1.0, 1.0), hed_p=0.0, blur_p=0.0, noise_p=0.0, gamma=(1.0, 1.0),
                               contrast=(1.0, 1.0), brightness=0.0, channel_gain=0.0, dim_p=0.0,
                               nucleus_centred_p=0.0, gray_p=0.0, invert_p=0.0, aspect_p=0.0, paste_p=0.0)


def is_colour(image: np.ndarray) -> bool:
    """A (3, H, W) network input whose channels differ (grayscale images are replicated into 3 channels)."""
    return not (np.array_equal(image[0], image[1]) and np.array_equal(image[1], image[2]))


def hed_jitter(image: np.ndarray, rng: np.random.Generator, gain: float, shift: float) -> np.ndarray:
    """Scale and shift each stain's optical density (haematoxylin, eosin, DAB) and recompose the RGB image."""
    from skimage.color import hed2rgb, rgb2hed
    rgb = np.clip(np.moveaxis(image, 0, -1), 1e-3, 1.0)
    hed = rgb2hed(rgb)
    flat = hed.reshape(-1, 3)
    high, low = np.percentile(flat[::7], 99, axis=0), np.minimum(flat.min(0), 0)   # a sample is enough for p99
    jittered = hed * rng.uniform(1 - gain, 1 + gain, 3) + rng.uniform(-shift, shift, 3) * np.abs(high)
    # No stain below what the image had: a negative optical density would tint the image in the stain's
    # complementary colour (green for eosin), which no slide shows.
    hed = np.maximum(jittered, low)
    return np.moveaxis(np.clip(hed2rgb(hed), 0, 1), -1, 0).astype(np.float32)


def dim_nuclei(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, fraction: float,
               factor: tuple[float, float]) -> np.ndarray:
    """Pull a random `fraction` of the nuclei (masks (N, H, W) bool) towards the background level."""
    if len(masks) == 0:
        return image
    nuclei = masks.any(0)
    if nuclei.all():
        return image
    background = np.median(image[:, ~nuclei], axis=1)[:, None]       # per channel
    out = image.copy()
    for k in np.flatnonzero(rng.random(len(masks)) < fraction):
        m = masks[k]
        out[:, m] = background + (image[:, m] - background) * rng.uniform(*factor)
    return out


def augment_pixels(image: np.ndarray, masks: np.ndarray, colour: bool, rng: np.random.Generator,
                   aug: Augmentation) -> np.ndarray:
    """The photometric augmentations of the module docstring, in a fixed order, each with its probability."""
    from scipy.ndimage import gaussian_filter
    out = np.asarray(image, np.float32)
    if colour and rng.random() < aug.hed_p:
        out = hed_jitter(out, rng, aug.hed_gain, aug.hed_shift)
    if colour and rng.random() < aug.gray_p:
        out = np.repeat((0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])[None], 3, axis=0).astype(np.float32)
        colour = False    # from here on treated as the grayscale image it now is
    elif not colour and aug.invert_p and rng.random() < aug.invert_p:
        out = 1.0 - out   # a gray crop only: one converted from colour already has brightfield's polarity
    if rng.random() < aug.dim_p:
        out = dim_nuclei(out, masks, rng, aug.dim_fraction, aug.dim_factor)
    if rng.random() < aug.blur_p:
        out = gaussian_filter(out, sigma=(0, *[rng.uniform(*aug.blur_sigma)] * 2)).astype(np.float32)
    out = np.clip(out, 0, 1) ** np.exp(rng.uniform(*np.log(aug.gamma)))
    mean = out.mean()
    out = (out - mean) * rng.uniform(*aug.contrast) + mean + rng.uniform(-aug.brightness, aug.brightness)
    if colour:
        out = out * rng.uniform(1 - aug.channel_gain, 1 + aug.channel_gain, (3, 1, 1))
    if rng.random() < aug.noise_p:   # one noise plane for a grayscale image: its 3 channels stay equal
        out = out + rng.normal(0, rng.uniform(*aug.noise_std), out.shape if colour else out.shape[1:])
    return np.clip(out, 0, 1).astype(np.float32)

"""Which modality a slide looks like, from its thumbnail: the check of a protocol's `modality`.

A protocol is chosen by the user (`--protocol`, fluorescence-nuclei by default), and its modality decides the score
threshold, the scale in µm and the calibration behind the count's interval. An H&E slide counted with the default
protocol gets fluorescence's: a count that looks fine and an interval that is not its own. So the count says so
(`modality_warning`), from two figures of the thumbnail's tissue pixels as the network would see them:

- light_ground: where the median pixel lies between the darkest and the brightest 1 % (0 dark, 1 light). Nuclei are
  a minority of the pixels: bright on a dark ground in fluorescence, dark on a light ground in brightfield.
- colour: the network input has colour (intensity.gray_input): brightfield stains do, a nuclear stain's one channel
  does not.

Measured on every annotated image of the four training datasets, each planned as a count plans it
(`python -m references.nuclei.modality_check`, 2026-11-28): light_ground is at most 0.53 for the 620 fluorescence
images (median 0.03), none in colour, and at least 0.235 for the 809 colour brightfield ones, 0.74 for the 16 gray
ones. A colour image is brightfield from LIGHT_GROUND_COLOUR on (below it: a fluorescence image saved in colour,
nuclei bright on black); a gray one from LIGHT_GROUND_GRAY, fluorescence below DARK_GROUND_GRAY, and between the two
nothing is claimed (dense fluorescence sections and pale smears meet there: one Kromp image at 0.53 and one gray
brightfield image at 0.74 fall there). No image of the 1,445 looks like the other modality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LIGHT_GROUND_COLOUR = 0.15
LIGHT_GROUND_GRAY = 0.8
DARK_GROUND_GRAY = 0.5
# which protocol to name for a modality in the warning
PROTOCOL_FOR = {"fluorescence": "fluorescence-nuclei", "brightfield": "he-nuclei"}


@dataclass(frozen=True)
class Look:
    """What a slide looks like: `modality` (fluorescence | brightfield, None when it cannot be told), from
    `light_ground` (0: the median pixel as dark as the darkest 1 %, 1: as light as the brightest) and `colour`."""

    modality: str | None
    light_ground: float
    colour: bool
    measured_on: str = "tissue"     # the pixels looked at: the thumbnail's on tissue, or (cellseg info) all of it

    def describe(self) -> str:
        dark_nuclei = self.modality == "brightfield" if self.modality else self.light_ground >= 0.5
        nuclei = "nuclei darker than their ground" if dark_nuclei else "nuclei brighter than their ground"
        return (f"{nuclei}, {'in colour' if self.colour else 'gray'} (the median {self.measured_on} pixel at "
                f"{self.light_ground:.2f} of the range)")

    def to_dict(self) -> dict:
        return {"modality": self.modality, "light_ground": round(self.light_ground, 4), "colour": self.colour}


def slide_look(pixels: np.ndarray, colour: bool, measured_on: str = "tissue") -> Look:
    """The look of `pixels` (n, C) or (h, w, C): a slide's thumbnail pixels on tissue in the model's channels
    (plan.tissue_pixels of intensity.select_channels); colour: the network input has colour (not gray_input)."""
    flat = np.asarray(pixels).reshape(-1, np.shape(pixels)[-1])
    # every k-th pixel: a whole-slide thumbnail's millions say no more about its ground than a million
    luminance = flat[::max(1, len(flat) >> 20)].astype(np.float32).mean(-1)
    luminance = luminance[np.isfinite(luminance)]
    if luminance.size == 0:
        return Look(None, float("nan"), colour, measured_on)
    dark, median, light = np.percentile(luminance, [1, 50, 99])
    if light - dark <= 0:       # a flat image: no nuclei to tell by
        return Look(None, float("nan"), colour, measured_on)
    ground = float((median - dark) / (light - dark))
    if colour:
        modality = "brightfield" if ground >= LIGHT_GROUND_COLOUR else "fluorescence"
    elif ground >= LIGHT_GROUND_GRAY:
        modality = "brightfield"
    elif ground < DARK_GROUND_GRAY:
        modality = "fluorescence"
    else:
        modality = None
    return Look(modality, ground, colour, measured_on)


def modality_warning(look: Look, protocol_name: str, protocol_modality: str, mpp: float | None = None) -> str | None:
    """A sentence when the slide looks like another modality than its protocol's, else None. mpp: the slide's pixel
    size; without one the sentence says to give it where the protocol it names needs it (he-nuclei does)."""
    if look.modality is None or look.modality == protocol_modality:
        return None
    suggested = PROTOCOL_FOR[look.modality]
    give_mpp = ""
    if mpp is None:
        from .protocol import load_protocol
        if load_protocol(suggested).require_mpp:
            give_mpp = f" --mpp <µm per pixel> ({suggested} needs the pixel size; this image gives none)"
    return (f"the slide looks like {look.modality}: {look.describe()}; protocol {protocol_name} is for "
            f"{protocol_modality}: its score threshold, scale and count interval are {protocol_modality}'s; count it "
            f"with --protocol {suggested}{give_mpp}, or with a protocol of your own for {look.modality}")


def images_warning(looks: list[Look], protocol_name: str, protocol_modality: str) -> str | None:
    """A sentence when some of a set of images (a fine-tune's, `cellseg train`) look like another modality than the
    protocol's, else None."""
    other = [look for look in looks if look.modality not in (None, protocol_modality)]
    if not other:
        return None
    modality = other[0].modality
    return (f"{len(other)} of the {len(looks)} images look like {modality} ({other[0].describe()}) but protocol "
            f"{protocol_name} is for {protocol_modality}: pass --protocol {PROTOCOL_FOR[modality]}, whose threshold "
            f"and scale are the ones a fine-tune retunes and keeps")

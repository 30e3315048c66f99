"""How the slide is resampled for the network, and the tile geometry that follows: plain arithmetic, no torch,
so `cellseg info` plans the same tiles as `cellseg count` without loading the network."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ParameterError
from .protocol import Protocol


@dataclass(frozen=True)
class Scale:
    """How the slide is resampled for the network: `factor` network px per slide px."""

    factor: float
    source: str
    model_diameter_px: float | None = None
    image_diameter_px: float | None = None


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

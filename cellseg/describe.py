"""What `cellseg info` prints: a slide as cellseg sees it, before a long run.

Format and backend, the size of every pyramid level, channels and their names, the pixel size and where it
came from, the tiles the protocol would cut (the same geometry as `cellseg count`: cellseg.planning.plan and
tiling.plan_tiles) and whether nuclei are grown into cells (cells/expansion.py). Plain arithmetic on the slide's
metadata, and what a small thumbnail looks like (planning/modality.py: a slide counted with the other modality's
protocol is said here, before the count): no torch.
"""

from __future__ import annotations

from .geometry import grid_shape, plan_tiles
from .planning import (
    NATIVE_WITHIN,
    Protocol,
    Scale,
    choose_scale,
    network_nucleus_px,
    pixel_size_diameter,
    tile_geometry,
)
from .slides import SlideInfo


def slide_look_of(slide, protocol: Protocol):
    """What an open slide looks like (planning.Look) from a 512 px thumbnail of the protocol's channel: all of it,
    as there is no tissue mask without the tissue network (glass, where much of it is, is the ground too)."""
    from .planning import gray_input, measure_range, model_channel, select_channels, slide_look, to_network_input
    thumbnail, _ = slide.read_thumbnail(512)
    pixels = select_channels(thumbnail, model_channel(protocol, slide))
    flat = pixels.reshape(-1, pixels.shape[-1])
    return slide_look(flat, colour=not gray_input(to_network_input(flat[None], measure_range(flat))),
                      measured_on="thumbnail")


def _z_line(z: int | str | None) -> str:
    if z is None:       # cellseg info without --z: what follows describes the max projection
        return "a count needs --z max, --z mean or --z N (plane N); described below as their max projection"
    return f"counting plane {z}" if isinstance(z, int) else f"counting their {z} projection"


def _t_line(t: int | None) -> str:
    if t is None:       # cellseg info without --t: what follows describes the first time point
        return "a count needs --t N (time point N) or --t all; described below at time point 1"
    return f"counting time point {t}"


def describe_slide(info: SlideInfo, protocol: Protocol, diameter_px: float | None = None, look=None) -> list[str]:
    """Lines of text about `info` and the tiles `protocol` cuts it into (at --diameter `diameter_px`, if given), and
    what it looks like (`look`, slide_look_of) with a warning when that is another modality than the protocol's."""
    scale = _scale(protocol, info, diameter_px)
    tile_px, halo_px = tile_geometry(protocol, scale)
    n_tiles = len(plan_tiles(info.height, info.width, tile_px, halo_px))
    rows, cols = grid_shape(info.height, info.width, tile_px)
    h0, w0 = info.levels[0]
    levels = ", ".join(f"{k}: {h} x {w}" + (f" (/{h0 / h:.3g})" if k else "") for k, (h, w) in enumerate(info.levels))
    lines = [
        str(info.path),
        f"  format      {info.format}, read by {info.backend}",
        f"  size        {info.height} x {info.width} px (rows x columns), {info.dtype}",
        *([f"  z-stack     {info.z_planes} planes (1-{info.z_planes}): " + _z_line(info.z)] if info.z_planes > 1 else []),
        *([f"  time        {info.t_points} points (1-{info.t_points}): " + _t_line(info.t)]
          if info.t_points > 1 else []),
        f"  pyramid     {len(info.levels)} level(s): {levels}",
        f"  channels    {_channels(info)}",
        "  pixel size  " + (f"{info.mpp:.4g} µm/px (from {info.mpp_source})" if info.mpp
                             else f"unknown ({info.mpp_source.removeprefix('none: ')})"),
        f"  tiles       {n_tiles} ({rows} x {cols}) of {tile_px} px with a {halo_px} px halo (protocol {protocol.name}; "
        f"the tissue prefilter then skips background ones)",
        f"  scale       {scale.factor:.3g}: {scale.source}",
        f"  cells       {_cells(protocol, info)}",
        f"  results     {_results(protocol, info)}",
    ]
    if look is not None:
        from .planning import modality_warning
        lines.append(f"  looks like  {look.modality or 'either modality'}: {look.describe()}")
        warning = modality_warning(look, protocol.name, protocol.modality, info.mpp)
        if warning:
            lines.append(f"  warning     {warning}")
    lines += [f"  warning     {w}" for w in info.warnings]
    lines += [f"  note        {d}" for d in info.details]
    return lines


def _cells(protocol: Protocol, info: SlideInfo) -> str:
    """The protocol's cell expansion on this slide, in words."""
    um, px = protocol.cell_expansion_um, protocol.cell_expansion_px
    if px is not None:
        return f"nuclei grown by up to {px:g} px into cells (cell_labels.ome.tif, cell and cytoplasm columns)"
    if not um:
        return "nuclei only (--cell-expansion-um D grows them into cells)"
    if not info.mpp:
        return f"a {um:g} µm cell expansion needs the pixel size: pass --mpp, or give it with --cell-expansion-px"
    return (f"nuclei grown by up to {um:g} µm = {um / info.mpp:.3g} px into cells (cell_labels.ome.tif, cell and "
            f"cytoplasm columns)")


DENSE_PER_MM2 = 4000     # nuclei per mm² of densely cellular tissue: the size of a count of the whole slide at that


def _results(protocol: Protocol, info: SlideInfo) -> str:
    """The result folder's size in words: per nucleus, and for the whole slide as dense tissue (cellseg count
    --estimate counts a sample of tiles for the slide's own)."""
    from .results import describe_size, expected_size
    grown = bool(protocol.cell_expansion_px or protocol.cell_expansion_um)
    colour = info.n_channels == 3       # an RGB overlay and crops compress less than gray ones
    fixed = expected_size(0, grown, protocol.outputs, info.height, info.width, colour)
    each = (expected_size(1e6, grown, protocol.outputs, info.height, info.width, colour) - fixed) / 1e6
    text = (f"about {describe_size(each)} a {'cell' if grown else 'nucleus'} + {describe_size(fixed)} "
            f"(outputs: {protocol.outputs})")
    if info.mpp:
        area_mm2 = info.height * info.width * info.mpp ** 2 / 1e6
        dense = expected_size(area_mm2 * DENSE_PER_MM2, grown, protocol.outputs, info.height, info.width, colour)
        # two significant digits below 1 mm²: a 864 x 1056 field at 0.25 µm/px (0.057 mm²) read as 0.1
        area = f"{area_mm2:.2g}" if area_mm2 < 1 else f"{area_mm2:,.1f}"
        text += (f"; {describe_size(dense)} if all "
                 f"{area} mm² were tissue at {DENSE_PER_MM2:,} nuclei/mm² (`cellseg count --estimate` "
                 f"says for this slide)")
    return text


def _channels(info: SlideInfo) -> str:
    if info.channel_names and len(info.channel_names) == info.n_channels:
        return f"{info.n_channels}: " + ", ".join(info.channel_names)
    if info.n_channels == 1:
        return "1 (grayscale)"
    if info.n_channels == 3:
        return "3 (RGB)"
    return f"{info.n_channels} (unnamed: c0..c{info.n_channels - 1})"


def _scale(protocol: Protocol, info: SlideInfo, diameter_px: float | None) -> Scale:
    """The resampling `cellseg count` would choose (its nucleus size and scale in µm read from the model bundle):
    with --diameter, that; without, the pixel size's (planning.pixel_size_diameter), which the count checks against
    the nuclei it measures, or, with no pixel size to go by, the nuclei measured when counting (planning.decide_scale)."""
    from .bundles import load_bundle
    bundle = load_bundle(protocol.model)
    target = network_nucleus_px(protocol, bundle.nucleus_diameter_px)
    if diameter_px is not None:
        return choose_scale(target, diameter_px, protocol, info.mpp)
    implied = pixel_size_diameter(bundle.micron_scale(protocol.modality), protocol, info, target)
    if isinstance(implied, str):
        return Scale(1.0, f"set when counting, by the nuclei measured on the busiest tiles ({implied}); the tiles "
                          f"above are those at native scale")
    expected, target, how = implied
    factor = target / expected if abs(target / expected - 1) >= NATIVE_WITHIN else 1.0
    return Scale(factor, f"{how}; `cellseg count` checks it against the nuclei it measures")

"""Build a large, dense slide for throughput runs (not a test): the example mosaic mirrored out to N x N px.

The 2048 x 2048 example fluorescence mosaic (real held-out DSB2018 nuclei) is repeated with alternate copies
flipped, so every seam between copies is continuous, and written tile by tile as a pyramidal OME-TIFF
(0.5 µm/px, levels halved down to <= 1024 px): a whole-slide-sized field where every tile holds nuclei.
With --labels the ground truth is mirrored the same way (cell ids made unique per copy) into
NAME_labels.tif beside it, so `benchmarks/run.py` also reports correct cells.

    python benchmarks/make_big_slide.py --size 20480 --out /tmp/big.ome.tif [--labels]
    python benchmarks/run.py --slide /tmp/big.ome.tif --device cuda --json gpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "example_slides" / "fluo_mosaic.ome.tif"
TILE = 512


def mirrored_index(start: int, stop: int, period: int) -> np.ndarray:
    """Source index of output positions start..stop when a `period`-long source is tiled with every other copy
    reversed: 0 1 .. p-1 p-1 .. 1 0 0 1 .."""
    pos = np.arange(start, stop)
    copy, offset = np.divmod(pos, period)
    return np.where(copy % 2 == 1, period - 1 - offset, offset)


def source_levels(image: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """The source and its 2x2-mean reductions (the same reduction at every level keeps mirroring exact)."""
    levels = [image]
    for _ in range(n_levels - 1):
        a = levels[-1].astype(np.float32)
        levels.append(np.rint((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4).astype(image.dtype))
    return levels


def tiles(source: np.ndarray, side: int, ids_per_copy: int | None = None):
    """TILE x TILE tiles of the mirrored side x side image in row-major order (label ids offset per copy)."""
    period = source.shape[0]
    for r in range(0, side, TILE):
        rows = mirrored_index(r, min(r + TILE, side), period)
        for c in range(0, side, TILE):
            cols = mirrored_index(c, min(c + TILE, side), period)
            block = source[rows][:, cols]
            if ids_per_copy is not None:
                copy = (np.arange(r, r + len(rows)) // period)[:, None] * (side // period + 1) \
                    + (np.arange(c, c + len(cols)) // period)[None, :]
                block = np.where(block > 0, block.astype(np.uint32) + copy.astype(np.uint32) * ids_per_copy, 0)
            yield np.ascontiguousarray(block)


def write(path: Path, source: np.ndarray, side: int, mpp: float, labels: bool, channel: str | None) -> None:
    import tifffile
    sizes = [side]
    while sizes[-1] > 1024:
        sizes.append(sizes[-1] // 2)
    ids = int(source.max()) + 1 if labels else None
    levels = [source] if labels else source_levels(source, len(sizes))   # labels: level 0 only
    meta = {"axes": "YX", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm"}
    if channel and not labels:
        meta["Channel"] = {"Name": [channel]}
    dtype = np.uint32 if labels else source.dtype
    opts = dict(tile=(TILE, TILE), compression="zlib", compressionargs={"level": 1}, photometric="minisblack",
                dtype=dtype)
    with tifffile.TiffWriter(path, bigtiff=True, ome=not labels) as tw:
        if labels:
            tw.write(tiles(source, side, ids), shape=(side, side), metadata=None,
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **opts)
            return
        tw.write(tiles(levels[0], side), shape=(side, side), subifds=len(sizes) - 1, metadata=meta, **opts)
        for level, size in zip(levels[1:], sizes[1:]):
            tw.write(tiles(level, size), shape=(size, size), subfiletype=1, **opts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=20480, help="side in px (a multiple of 2048, the mosaic's side)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--labels", action="store_true", help="also write the mirrored ground truth as NAME_labels.tif")
    args = p.parse_args()
    from cellseg.geometry import Box
    from cellseg.slides import open_slide
    with open_slide(SOURCE) as slide:
        info = slide.info
        if info.height != info.width or args.size % info.height:
            raise SystemExit(f"expected --size a multiple of {info.height} px, got {args.size}")
        image = slide.read_region(Box(0, 0, info.height, info.width))[..., 0]
        channel = info.channel_names[0] if info.channel_names else None
    start = time.perf_counter()
    write(args.out, image, args.size, info.mpp or 0.5, labels=False, channel=channel)
    print(f"wrote {args.out}: {args.size} x {args.size} px, {args.out.stat().st_size / 1e6:.0f} MB "
          f"in {time.perf_counter() - start:.0f} s")
    if args.labels:
        import tifffile
        truth = tifffile.imread(SOURCE.with_name("fluo_mosaic_labels.tif"))
        name = args.out.name
        for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        target = args.out.with_name(f"{name}_labels.tif")
        write(target, truth, args.size, info.mpp or 0.5, labels=True, channel=None)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()

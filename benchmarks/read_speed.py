"""Region-read speed of each slide backend on a slide of each format (not a test): MP/s of level-0 pixels.

One RGB image (the example H&E mosaic mirrored out to --size px, real stained nuclei) is written in each format
by that format's own writer, then every backend reads the read boxes of `cellseg count`'s tile grid (512 px
cores with a 64 px halo, row-major, as the pipeline does) through `Slide.read_region`. MP/s counts core pixels
(the slide's area) per second of reading, and per CPU-second (all threads; steadier on a shared machine); best
of --repeats runs, the file in the page cache. Also printed: the time to open the slide and the file size.

| format | writer | backend |
|---|---|---|
| OME-TIFF, JPEG 256 px tiles | tifffile | tifffile; and OpenSlide on the same file (its generic-tiff reader) |
| DICOM WSI, JPEG 256 px frames | pydicom, on the header of tests/data/dicom/boxes_0.dcm (PixelMed's) | OpenSlide |
| CZI, zstd subblocks | pylibCZIrw (Zeiss's libCZI) | pylibCZIrw |
| OME-Zarr 0.5, zstd 256 px chunks | ome-zarr-py | zarr |
| PNG | Pillow | Pillow (decoded whole at open; regions are then copies from memory) |

No writer exists for MIRAX, VMS or BIF: OpenSlide reads those with the same code path as its DICOM and TIFF
readers (JPEG tiles), so the OpenSlide rows stand for them.

    python benchmarks/read_speed.py [--size 4096] [--repeats 3] [--keep /tmp/formats]
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "example_slides" / "he_mosaic.ome.tif"
DICOM_TEMPLATE = ROOT / "tests" / "data" / "dicom" / "boxes_0.dcm"
MPP = 0.25
TILE, HALO = 512, 64


def mirrored(image: np.ndarray, side: int) -> np.ndarray:
    """The image repeated out to side x side with every other copy flipped (continuous seams)."""
    def index(n: int, period: int) -> np.ndarray:
        copy_, offset = np.divmod(np.arange(n), period)
        return np.where(copy_ % 2 == 1, period - 1 - offset, offset)
    return np.ascontiguousarray(image[index(side, image.shape[0])][:, index(side, image.shape[1])])


def write_ome_tiff(path: Path, rgb: np.ndarray) -> None:
    import tifffile
    levels = [rgb]
    while max(levels[-1].shape[:2]) > 1024:
        levels.append(levels[-1][::2, ::2])
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, level in enumerate(levels):
            extra = dict(subifds=len(levels) - 1, metadata={"PhysicalSizeX": MPP, "PhysicalSizeY": MPP}) if k == 0 \
                else dict(subfiletype=1)
            tif.write(level, tile=(256, 256), compression="jpeg", compressionargs={"level": 90},
                      photometric="rgb", **extra)


def write_dicom(folder: Path, rgb: np.ndarray) -> Path:
    """A single-level DICOM WSI (TILED_FULL, JPEG baseline 256 px frames) on the header of a real DICOM WSI file."""
    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid
    ds = pydicom.dcmread(DICOM_TEMPLATE)
    h, w = rgb.shape[:2]
    t = 256
    frames = []
    for r in range(0, h, t):
        for c in range(0, w, t):
            tile = np.full((t, t, 3), 255, np.uint8)
            block = rgb[r:r + t, c:c + t]
            tile[:block.shape[0], :block.shape[1]] = block
            frames.append(imagecodecs.jpeg8_encode(tile, level=90, colorspace="RGB", outcolorspace="RGB"))
    ds = copy.deepcopy(ds)
    ds.Rows = ds.Columns = t
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
    ds.NumberOfFrames = len(frames)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [MPP / 1000, MPP / 1000]   # mm
    ds.ImagedVolumeHeight, ds.ImagedVolumeWidth = h * MPP / 1000, w * MPP / 1000
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    folder.mkdir()
    path = folder / "level0.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_czi(path: Path, rgb: np.ndarray) -> None:
    from pylibCZIrw import czi as pyczi
    with pyczi.create_czi(str(path), exist_ok=True, compression_options="zstd1:ExplicitLevel=1;PreProcess=HiLoByteUnpack") as czi:
        for r in range(0, rgb.shape[0], 1024):   # scanner-like subblocks
            for c in range(0, rgb.shape[1], 1024):
                czi.write(np.ascontiguousarray(rgb[r:r + 1024, c:c + 1024, ::-1]), location=(c, r))   # CZI is BGR
        czi.write_metadata(document_name=path.stem, scale_x=MPP * 1e-6, scale_y=MPP * 1e-6)


def write_ome_zarr(path: Path, rgb: np.ndarray) -> None:
    import ome_zarr
    image = ome_zarr.OMEZarrImage(data=np.moveaxis(rgb, -1, 0), axes="cyx", scale={"c": 1.0, "y": MPP, "x": MPP},
                                  axes_units={"y": "micrometer", "x": "micrometer"})
    ome_zarr.OMEZarrMultiscale(image=image, scale_factors=[2, 4], method="nearest").to_ome_zarr(
        str(path), version="0.5", storage_options={"chunks": (3, 256, 256)})


def write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(rgb).save(path, compress_level=1)


def measure(path: Path, force_openslide: bool, repeats: int) -> dict:
    from cellseg.geometry import plan_tiles
    from cellseg.slides import open_slide
    from cellseg.slides._openslide import open_openslide
    best_open, best_read, best_cpu = float("inf"), float("inf"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        slide = open_openslide(path, path) if force_openslide else open_slide(path)
        opened = time.perf_counter()
        with slide:
            info = slide.info
            tiles = plan_tiles(info.height, info.width, TILE, HALO)
            cpu = time.process_time()   # every thread of this process: decoders may use a pool
            for t in tiles:
                slide.read_region(t.read)
            done, cpu = time.perf_counter(), time.process_time() - cpu
        best_open, best_read, best_cpu = min(best_open, opened - start), min(best_read, done - opened), min(best_cpu, cpu)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return {"format": info.format, "backend": info.backend, "open_s": best_open, "read_s": best_read,
            "mp_per_s": info.height * info.width / 1e6 / best_read, "mb": size / 1e6, "tiles": len(tiles),
            "mp_per_cpu_s": info.height * info.width / 1e6 / max(best_cpu, 1e-9)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="side of the square slide in px")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", type=Path, default=None, help="write the slides here and keep them")
    args = p.parse_args()
    import tifffile
    rgb = mirrored(tifffile.imread(SOURCE), args.size)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="cellseg-formats-"))
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ome-tiff": folder / "slide.ome.tif", "dicom": folder / "dicom", "czi": folder / "slide.czi",
             "ome-zarr": folder / "slide.ome.zarr", "png": folder / "slide.png"}
    writers = {"ome-tiff": write_ome_tiff, "dicom": write_dicom, "czi": write_czi, "ome-zarr": write_ome_zarr,
               "png": write_png}
    for name, path in files.items():
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        start = time.perf_counter()
        writers[name](path, rgb)
        print(f"wrote {name} in {time.perf_counter() - start:.1f} s -> {path}", flush=True)
    runs = [(files["ome-tiff"], False), (files["ome-tiff"], True), (files["dicom"], False), (files["czi"], False),
            (files["ome-zarr"], False), (files["png"], False)]
    described = ["OME-TIFF pyramid, JPEG q90, 256 px tiles (tifffile)", "the same OME-TIFF",
                 "DICOM WSI, JPEG q90, 256 px frames (pydicom)", "CZI, zstd, 1024 px subblocks (pylibCZIrw)",
                 "OME-Zarr 0.5 pyramid, zstd, 256 px chunks (ome-zarr-py)", "PNG (Pillow)"]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    rows = [measure(path, force, args.repeats) for path, force in runs]
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"\n{args.size} x {args.size} px RGB slide ({args.size ** 2 / 1e6:.1f} MP), {rows[0]['tiles']} read boxes of "
          f"{TILE} px + {HALO} px halo, best of {args.repeats}; CPU {cpu1.ru_utime - cpu0.ru_utime:.1f} s user, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| slide (writer) | backend | file | open | reading the tile grid | MP/s | MP per CPU-second |")
    print("|---|---|---|---|---|---|---|")
    for what, row in zip(described, rows):
        print(f"| {what} | {row['backend']} | {row['mb']:.1f} MB | {row['open_s'] * 1000:.0f} ms | "
              f"{row['read_s']:.2f} s | **{row['mp_per_s']:.0f}** | {row['mp_per_cpu_s']:.0f} |")
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

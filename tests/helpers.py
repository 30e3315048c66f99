"""What several test modules share: paths, the tiny model's config, detectors that read a ground-truth label image
back, random cells, COCO annotations from a label image, and the CLI runner with its assertions.

Test modules import from here (never from one another); fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellseg.geometry import HostInput
from cellseg.planning import Protocol

# small tiles, no tissue prefilter: a count of a label-reading detector over a few hundred px in a second
SMALL_TILES = Protocol(name="test", tile_size=40, halo_px=10, batch_size=2, min_area_px=1, tissue_method="none")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
EXAMPLES = ROOT / "example_slides"


def tiny_model_config():
    """A small FPN and box head: quick to build and run, ~20 MB of float16 weights."""
    from cellseg.bundles import ModelConfig
    return ModelConfig(fpn_channels=32, box_head_size=64, detections_per_tile=300,
                       rpn_pre_nms_top_n_test=400, rpn_post_nms_top_n_test=300,
                       rpn_pre_nms_top_n_train=400, rpn_post_nms_top_n_train=200, box_batch_size_per_image=64)


# --------------------------------------------------------------------------- detectors that read labels back

class LabelReadingDetector(HostInput):
    """A TileDetector that 'detects' the cells of a ground-truth label image visible in each tile's read box
    (clipped): a real result from the real pipeline in seconds, with known cells (no network).

    score: every cell's score, or None for scores spread over 0.5..1.0 in label order.
    shift_px > 0 moves every mask by +-shift_px depending on the tile's grid parity, so neighbouring
    tiles see the same cell at slightly different places (as two Mask R-CNN views of it would).
    It has no slide-level statistics (`calibrated` keeps the windows it is given, for tests to look at, and returns
    the detector itself) and records the index of every tile it is shown (`seen`).
    """

    device = "cpu"
    class_names = ("nucleus",)

    def __init__(self, labels: np.ndarray, shift_px: int = 0, score: float | None = 0.9,
                 seconds_per_tile: float = 0.0):
        self.labels = labels
        self.shift_px = shift_px
        self.score = score
        self.seconds_per_tile = seconds_per_tile     # a count slow enough to be interrupted on purpose
        self.windows: list[np.ndarray] = []
        self.gray: bool | None = None          # what the last calibration was told of the slide's input
        self.seen: list[int] = []

    def calibrated(self, windows, gray=False) -> LabelReadingDetector:
        self.windows = [w.copy() for w in windows]
        self.gray = gray
        return self

    def detect(self, images, tiles, scale=1.0):
        for t, img in zip(tiles, images):      # the network sees the tile resampled by `scale`
            assert img.shape[-2:] == (max(1, round(t.read.height * scale)), max(1, round(t.read.width * scale)))
        if self.seconds_per_tile:
            import time
            time.sleep(self.seconds_per_tile * len(tiles))
        self.seen.extend(t.index for t in tiles)
        return [self._tile(t, t.read.shape) for t in tiles]

    def _tile(self, tile, shape):
        from scipy import ndimage

        from cellseg.geometry import TileDetections
        crop = self.labels[tile.read.slices()]
        boxes, masks = [], []
        dr = self.shift_px * (1 if tile.grid_row % 2 else -1)
        dc = self.shift_px * (1 if tile.grid_col % 2 else -1)
        for label, sl in enumerate(ndimage.find_objects(crop), start=1):
            if sl is None:
                continue
            mask = crop[sl] == label
            r0, c0 = sl[0].start + dr, sl[1].start + dc
            r1, c1 = r0 + mask.shape[0], c0 + mask.shape[1]
            # clip the moved mask to the tile
            cr0, cc0, cr1, cc1 = max(r0, 0), max(c0, 0), min(r1, shape[0]), min(c1, shape[1])
            if cr0 >= cr1 or cc0 >= cc1:
                continue
            m = mask[cr0 - r0:cr1 - r0, cc0 - c0:cc1 - c0]
            if not m.any():
                continue
            boxes.append((cr0, cc0, cr1, cc1))
            masks.append(m)
        n = len(masks)
        scores = (np.full(n, self.score, np.float32) if self.score is not None
                  else np.linspace(0.5, 1.0, n, dtype=np.float32))
        return TileDetections(np.asarray(boxes, np.int64).reshape(-1, 4), masks, scores, np.ones(n, np.int64))


@dataclass(frozen=True)
class LabelCounterSpec:
    """counter.CounterSpec's interface for counters whose detector reads the label image file `labels` back
    (LabelReadingDetector), so that Dask workers load their own (run/distributed.py). Each load appends the loading
    process's id to the file `loads`, when given."""

    protocol: object
    labels: Path
    loads: Path | None = None
    shift_px: int = 0
    seconds_per_tile: float = 0.0
    mpp: float | None = None
    regions: object = None          # regions.RegionFile
    z: int | str | None = None      # what of a Z-stack is counted (slides.open_slide)
    series: int | None = None       # which image of a multi-image file is counted (slides.open_slide)
    t: int | None = None            # which time point of a time series is counted (slides.open_slide)

    def load(self):
        import os

        import tifffile

        from cellseg.results import RunInfo
        from cellseg.run import CellCounter
        if self.loads is not None:
            with open(self.loads, "a") as fh:
                fh.write(f"{os.getpid()}\n")
        detector = LabelReadingDetector(tifffile.imread(self.labels), self.shift_px, score=None,
                                        seconds_per_tile=self.seconds_per_tile)
        return CellCounter(self.protocol, detector, mpp=self.mpp, run_info=RunInfo(model=self.model),
                           regions=self.regions, z=self.z, series=self.series, t=self.t)

    @property
    def model(self) -> dict:
        return {"name": "label reader", "labels": str(self.labels), "shift_px": self.shift_px}

    def settings(self) -> dict:
        from cellseg.run import counting_settings
        return counting_settings(self.protocol, self.model, self.mpp, None, self.regions, self.z, self.series, self.t)


class Tally:
    """A cohort.JobProgress that adds up what it is told."""

    def __init__(self):
        self.total = self.done = 0

    def planned(self, tiles: int) -> None:
        self.total += tiles

    def analysed(self, tiles: int) -> None:
        self.done += tiles


def count_with(detector, slide: Path, out: Path, protocol, **options) -> dict:
    """Count `slide` into the result folder `out` through the library's entry point (counter.CellCounter)."""
    from cellseg.run import CellCounter
    return CellCounter(protocol, detector, **options).count(slide, out)


def oracle_result(slide: Path, labels: Path, out: Path, protocol: str = "fluorescence-nuclei") -> Path:
    """A real result folder of `slide` whose cells are those of the label image `labels`."""
    import tifffile

    from cellseg.planning import load_protocol
    count_with(LabelReadingDetector(tifffile.imread(labels), score=None), slide, out, load_protocol(protocol))
    return out


def random_cells(height: int, width: int, max_diameter: int, n: int, seed: int) -> np.ndarray:
    """Non-overlapping random ellipses no wider than max_diameter, labelled 1..k."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.int32)
    rr, cc = np.mgrid[:height, :width]
    next_label = 1
    for _ in range(n):
        a, b = rng.uniform(1.5, max_diameter / 2, size=2)
        r, c = rng.uniform(0, height), rng.uniform(0, width)
        blob = ((rr - r) / a) ** 2 + ((cc - c) / b) ** 2 <= 1
        if blob.sum() < 3 or (labels[blob] > 0).any():
            continue
        labels[blob] = next_label
        next_label += 1
    return labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images hold the same cells, up to renumbering."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[fg])) == len(np.unique(b[fg]))


# --------------------------------------------------------------------------- annotations

def coco_from_labels(tmp_path: Path, image_path: Path, labels_path: Path) -> tuple[Path, int]:
    """A COCO file (RLE masks) for one of the test images, the way annotation tools export it: (path, cells)."""
    import pycocotools.mask as mask_utils
    import tifffile
    labels = tifffile.imread(labels_path)
    shutil.copy(image_path, tmp_path / image_path.name)
    anns = []
    for k in np.unique(labels[labels > 0]):
        rle = mask_utils.encode(np.asfortranarray((labels == k).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "segmentation": rle, "iscrowd": 0,
                     "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle))})
    coco = {"images": [{"id": 1, "file_name": image_path.name, "height": labels.shape[0], "width": labels.shape[1]}],
            "annotations": anns, "categories": [{"id": 1, "name": "nucleus"}]}
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(coco))
    return path, len(anns)


# --------------------------------------------------------------------------- the CLI

def invoke(args: list) -> click.testing.Result:  # noqa: F821
    """Run `cellseg ARGS` in-process, stderr kept apart from stdout."""
    from click.testing import CliRunner

    from cellseg.cli import main
    try:
        runner = CliRunner(mix_stderr=False)  # click 8.1: keep stderr apart
    except TypeError:
        runner = CliRunner()  # click >= 8.2 always does
    return runner.invoke(main, [str(a) for a in args], prog_name="cellseg")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_user_error(result, exit_code: int, *words: str) -> str:
    """One line `cellseg: error: ...` on stderr holding `words`, the exit code, no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("cellseg: error: "), line
    for word in words:
        assert word.lower() in line.lower(), (word, line)
    assert result.stdout == ""
    return line


# --------------------------------------------------------------------------- result folders

FAST = ["--device", "cpu", "-q", "--tile-size", "64", "--halo", "16", "--tissue", "none"]   # quick CLI counts
STAGING = re.compile(r"^\..+\.(tmp|old)-\d+-[0-9a-f]+$")


def listing(folder: Path) -> set[str]:
    """Every path under `folder` (hidden ones included), relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_same_result(a: Path, b: Path) -> None:
    """Two result folders with the same cells.csv rows and the same labels.ome.tif pixels."""
    import tifffile
    assert (a / "cells.csv").read_bytes() == (b / "cells.csv").read_bytes()
    assert np.array_equal(tifffile.imread(a / "labels.ome.tif"), tifffile.imread(b / "labels.ome.tif"))


def assert_report_reads_the_slide_as_counted(folder: Path, said: str) -> None:
    """The report of the result in `folder` says `said` (what of the file was counted), and says it again with its
    crops when `cellseg report` rebuilds it, reading the slide back as run.json says it was counted."""
    assert said in (folder / "report.html").read_text()
    rebuilt = invoke(["report", folder])
    assert rebuilt.exit_code == 0, rebuilt.output
    page = (folder / "report.html").read_text()
    assert said in page and "crops left out" not in page and "data:image/png;base64" in page


def resumed_with_other_settings(spec, other, slide: Path, out: Path):
    """The outcome of resuming `spec`'s count of `slide` into `out` with the counter spec `other` (after checking that
    resuming with `spec` itself skips the complete result)."""
    from cellseg.run import count_serially
    (done,) = count_serially(spec.load(), [(slide, out)])
    (again,) = count_serially(spec.load(), [(slide, out)], resume=True)     # the same count: skipped
    assert done.error is None and again.skipped
    (resumed,) = count_serially(other.load(), [(slide, out)], resume=True)
    return resumed


def assert_nothing_left(folder: Path, before: set[str]) -> None:
    after = listing(folder)
    assert after == before, f"left behind: {sorted(after - before)}, removed: {sorted(before - after)}"
    assert not [n for n in after if STAGING.match(Path(n).name)]


# --------------------------------------------------------------------------- nuclei label images

def random_nuclei(shape: tuple[int, int], n: int, seed: int, max_radius: int = 6) -> np.ndarray:
    """Discs (radius 0 = one pixel) on integer centres, so that many pixels lie at equal distance from two
    nuclei; ids are scattered over a large range (they must not matter). A later disc does not paint over an
    earlier one."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    rows, cols = np.indices(shape)
    ids = rng.choice(np.arange(1, 10 * n), n, replace=False)
    for cid in ids:
        r, c, radius = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(0, max_radius + 1)
        disc = ((rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2) & (labels == 0)
        labels[disc] = cid
    return labels


# --------------------------------------------------------------------------- slide files

def write_ome_zarr(path: Path, data: np.ndarray, axes: str, version: str = "0.5", mpp: float = 0.5,
                   unit: str = "micrometer", names: list[str] | None = None, levels: int = 3) -> Path:
    """OME-Zarr's own writer (ome-zarr-py): a pyramid of `levels` levels halving y and x."""
    import pytest
    ome_zarr = pytest.importorskip("ome_zarr", reason="ome-zarr-py (the writer) needs Python 3.11+")
    scale = {ax: (mpp if ax in "yx" else 1.0) for ax in axes}
    image = ome_zarr.OMEZarrImage(data=data, axes=axes, scale=scale, axes_units={"y": unit, "x": unit})
    ms = ome_zarr.OMEZarrMultiscale(image=image, scale_factors=[2 ** k for k in range(1, levels)],
                                    channel_names=names, method="nearest")
    chunks = tuple(1 if ax in "tcz" else 32 for ax in axes)
    ms.to_ome_zarr(str(path), version=version, storage_options={"chunks": chunks})
    return path


def write_multi_file_ome(folder: Path, stem: str, positions: list[np.ndarray], mpp: float = 0.5,
                           layout: str = "planes", split_from: int | None = None) -> list[Path]:
    """A multi-file OME-TIFF: each position's time points (`positions`: T x Y x X each) in a file of their own, named
    as Micro-Manager names them (`STEM_MMStack_PosN.ome.tif`) but without its index map, so read as OME; every file
    holding the OME-XML of the whole set, whose TiffData elements name the file (UUID and FileName) each plane is in.
    `layout`: "planes" (each plane's strips after its own IFD), "contiguous" (one uncompressed block:
    memory-mappable) or "tiled" (32² tiles). `split_from`: a position's time points from there on go into a second
    file, `STEM_MMStack_PosN_1.ome.tif`, as a writer starting one every 4 GB does. The paths, first file first."""
    import uuid

    import tifffile
    files = []     # (name, uuid, position, first time point, last + 1)
    for p, stack in enumerate(positions):
        cut = split_from if split_from is not None else len(stack)
        files.append((f"{stem}_MMStack_Pos{p}.ome.tif", f"urn:uuid:{uuid.uuid4()}", p, 0, cut))
        if cut < len(stack):
            files.append((f"{stem}_MMStack_Pos{p}_1.ome.tif", f"urn:uuid:{uuid.uuid4()}", p, cut, len(stack)))
    images = []
    for p, stack in enumerate(positions):
        tiff_data = "".join(f'<TiffData FirstT="{t}" FirstZ="0" FirstC="0" IFD="{t - t0}" PlaneCount="1">'
                            f'<UUID FileName="{name}">{uid}</UUID></TiffData>'
                            for name, uid, q, t0, t1 in files if q == p for t in range(t0, t1))
        images.append(f'<Image ID="Image:{p}" Name="Pos{p}"><Pixels ID="Pixels:{p}" DimensionOrder="XYCZT" '
                      f'Type="{stack.dtype.name}" SizeX="{stack.shape[2]}" SizeY="{stack.shape[1]}" SizeC="1" '
                      f'SizeZ="1" SizeT="{len(stack)}" PhysicalSizeX="{mpp}" PhysicalSizeY="{mpp}">'
                      f'<Channel ID="Channel:{p}:0" Name="DAPI" SamplesPerPixel="1"/>{tiff_data}</Pixels></Image>')
    for name, uid, p, t0, t1 in files:
        xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
               f'UUID="{uid}">{"".join(images)}</OME>')
        with tifffile.TiffWriter(folder / name) as tw:
            for t in range(t0, t1):
                tw.write(positions[p][t], description=xml if t == t0 else None, metadata=None,
                         contiguous=layout == "contiguous", tile=(32, 32) if layout == "tiled" else None)
    return [folder / name for name, *_ in files]


def write_micromanager_stack(folder: Path, prefix: str, positions: list[np.ndarray], mpp: float = 0.5,
                             per_file: bool = True, frames_planned: int | None = None,
                             split_from: int | None = None, ome_xml: bool = False) -> list[Path]:
    """A Micro-Manager acquisition saved as "image stack file" (MMStack), laid out as Micro-Manager writes it and as
    tifffile's MMStack reader reads it: after the TIFF header, Micro-Manager's own (index map, display settings,
    comments and summary offsets) and the summary (JSON); each plane's IFD of 13 entries (162 bytes) followed by its
    pixels; at the end the index map (channel, slice, frame, position, IFD offset of each plane). `positions`: uint16
    T x Y x X each; a file per position, PREFIX_MMStack_PosN.ome.tif (Micro-Manager's default), or all in
    PREFIX_MMStack.ome.tif; `frames_planned`: the summary's frame count, more than written for an acquisition
    stopped early; `split_from`: a file's time points from there on go into a next file, PREFIX_MMStack_PosN_1.ome.tif,
    as Micro-Manager starts one every 4 GB. `ome_xml`: as Micro-Manager 2 writes its files, the first file's first IFD
    also holds the acquisition's OME-XML (an image a position, its planes placed by file name and UUID) and every other
    file's a BinaryOnly OME-XML naming that file. The paths, each file's first file before it."""
    import struct
    import uuid
    frames, height, width = positions[0].shape
    summary = {"MicroManagerVersion": "2.0.0", "Prefix": prefix, "Frames": frames_planned or frames,
               "Positions": len(positions),
               "Channels": 1, "Slices": 1, "Width": width, "Height": height, "PixelType": "GRAY16",
               "PixelSize_um": mpp, "TimeFirst": False, "SlicesFirst": True,
               "StagePositions": [{"Label": f"Pos{p}"} for p in range(len(positions))]}
    groups = [[p] for p in range(len(positions))] if per_file else [list(range(len(positions)))]
    cut = split_from if split_from is not None else frames
    files = [(group, f"{prefix}_MMStack{f'_Pos{group[0]}' if per_file else ''}{suffix}.ome.tif", times)
             for group in groups for suffix, times in (("", range(cut)), ("_1", range(cut, frames))) if times]
    uuids = {name: f"urn:uuid:{uuid.UUID(int=k + 1)}" for k, (_, name, _) in enumerate(files)}
    ns = 'xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"'

    def description(name: str) -> bytes:
        if name != files[0][1]:
            return (f'<?xml version="1.0" encoding="UTF-8"?><OME {ns} UUID="{uuids[name]}"><BinaryOnly '
                    f'MetadataFile="{files[0][1]}" UUID="{uuids[files[0][1]]}"/></OME>').encode() + b"\0"
        images = []
        for p in range(len(positions)):
            planes = "".join(
                f'<TiffData FirstT="{t}" FirstZ="0" FirstC="0" IFD="{group.index(p) * len(times) + t - times.start}"'
                f' PlaneCount="1"><UUID FileName="{file}">{uuids[file]}</UUID></TiffData>'
                for group, file, times in files if p in group for t in times)
            images.append(f'<Image ID="Image:{p}" Name="Pos{p}"><Pixels ID="Pixels:{p}" DimensionOrder="XYCZT" '
                          f'Type="uint16" SizeX="{width}" SizeY="{height}" SizeZ="1" SizeC="1" SizeT="{frames}" '
                          f'PhysicalSizeX="{mpp}" PhysicalSizeY="{mpp}"><Channel ID="Channel:{p}:0" '
                          f'SamplesPerPixel="1"/>{planes}</Pixels></Image>')
        return (f'<?xml version="1.0" encoding="UTF-8"?><OME {ns} UUID="{uuids[files[0][1]]}">{"".join(images)}'
                f'</OME>').encode() + b"\0"

    paths = []
    for group, name, times in files:
        s = json.dumps(summary).encode()
        out = bytearray(b"II*\0" + b"\0" * 4)       # first IFD offset patched below
        out += struct.pack("<II", 54773648, 0)      # index map header, offset patched below
        out += struct.pack("<IIIIII", 483765892, 0, 99384722, 0, 2355492, len(s)) + s
        entries = []
        for p in group:
            for t in times:
                if len(out) % 2:
                    out += b"\0"
                ifd = len(out)
                data = positions[p][t].astype("<u2").tobytes()
                meta = json.dumps({"PositionIndex": p, "FrameIndex": t, "PixelSizeUm": mpp}).encode() + b"\0"
                text = description(name) if ome_xml and not entries else b""
                size = 162 + 12 * bool(text)      # 13 entries, 14 with the OME-XML
                after = ifd + size + len(data)
                tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 16), (259, 3, 1, 1), (262, 3, 1, 1),
                        *([(270, 2, len(text), after + 16 + len(meta))] if text else []),
                        (273, 4, 1, ifd + size), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, len(data)),
                        (282, 5, 1, after), (283, 5, 1, after + 8), (296, 3, 1, 3), (51123, 2, len(meta), after + 16)]
                body = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *tag) for tag in tags)
                next_at = after + 16 + len(meta) + len(text)
                next_at += next_at % 2
                body += struct.pack("<I", next_at)
                assert len(body) == size
                out += body + data + struct.pack("<IIII", int(1e4 / mpp), 1, int(1e4 / mpp), 1) + meta + text
                if len(out) % 2:
                    out += b"\0"
                entries.append((0, 0, t, p, ifd))
        last = entries[-1][4]
        struct.pack_into("<I", out, last + 2 + 12 * struct.unpack_from("<H", out, last)[0], 0)
        struct.pack_into("<I", out, 4, entries[0][4])
        index_at = len(out)
        out += struct.pack("<II", 3453623, len(entries)) + b"".join(struct.pack("<5I", *e) for e in entries)
        display, comments = json.dumps([{"Color": -1}]).encode(), json.dumps({"Summary": ""}).encode()
        display_at = len(out)
        out += struct.pack("<II", 347834724, len(display)) + display
        comments_at = len(out)
        out += struct.pack("<II", 84720485, len(comments)) + comments
        struct.pack_into("<I", out, 12, index_at)
        struct.pack_into("<I", out, 20, display_at)
        struct.pack_into("<I", out, 28, comments_at)
        (folder / name).write_bytes(bytes(out))
        paths.append(folder / name)
    return paths

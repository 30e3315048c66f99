"""One count run for the widget: the CLI's own entry point (`cellseg.run.counter.CellCounter`), with progress and cancel.

No Qt: the widget calls `run_count` in a napari thread worker and passes a progress callback and a
threading.Event; tests call it directly. The counter reports (tiles done, tiles total) after each tile; when
`cancel` is set, the callback raises `Cancelled`, the pipeline stops there and `staged_output` removes the
half-written folder.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellseg.errors import CellsegError
from cellseg.geometry import Box

from ._layers import REGION_FILE

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]   # (tiles done, tiles total)


class Cancelled(CellsegError):
    """The user cancelled the run; nothing was written."""


@dataclass
class Failed:
    """A worker body's CellsegError (a cancel too), returned as a value: superqt re-raises a returned exception as
    the worker's error, which napari shows as a traceback."""

    error: CellsegError


@dataclass
class CountRequest:
    """What the widget asks for. `slide` is a file to count whole, or the source of `region`.

    region: count only this level-0 box (the pixels are copied into a temporary tiled TIFF first);
    read: where the region's pixels come from when the image is not a file (an in-memory layer);
    regions: count only inside these (a GeoJSON dict in the image's level-0 px: _regions.shapes_to_geojson), as
    `cellseg count --regions` does.
    """

    slide: Path | None
    series: int | None = None                # the image of a multi-image `slide` (a position's layer), from 0
    protocol: str = "fluorescence-nuclei"
    device: str = "auto"
    model: str | None = None                 # bundle folder or shipped name; None: the protocol's
    score_threshold: float | None = None
    channel: int | None = None
    output: Path | None = None               # result folder; None: a new temporary folder
    region: Box | None = None
    read: Callable[[Box], np.ndarray] | None = None
    shape: tuple[int, int] | None = None     # (h, w) of the in-memory image (with read)
    n_channels: int = 1
    dtype: str = "uint8"
    mpp: float | None = None
    name: str = "image"
    regions: dict | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class CancellableProgress:
    """The pipeline's progress callback for the widget: reports to `progress`, and raises Cancelled once `cancel`
    is set (checked before and after each report)."""

    progress: ProgressCallback | None = None
    cancel: threading.Event | None = None

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled by the user; no result was written")

    def __call__(self, done: int, total: int) -> None:
        self.check()
        if self.progress is not None:
            self.progress(done, total)
        self.check()


def keep_triton_out(maps: Path = Path("/proc/self/maps")) -> bool:
    """Keep torch from loading Triton into a napari whose OpenGL is Mesa's software renderer; True when it did.

    Mesa's llvmpipe (a virtual machine, a remote desktop, Xvfb) maps its libLLVM into the process; Triton's own
    LLVM (in the CUDA builds of torch, imported by torchvision through torch._dynamo) then crashes the process as
    it loads (a segmentation fault on the first count after the viewer is up). Counting never uses Triton (it is
    torch.compile's GPU code generator), so when libLLVM is mapped and Triton is not loaded yet, `import triton`
    is made to fail (sys.modules["triton"] = None), which torch takes as "no Triton". Linux only (/proc)."""
    if "triton" in sys.modules:
        return False
    try:
        mapped = maps.read_text(errors="replace")
    except OSError:
        return False
    if "libLLVM" not in mapped:
        return False
    sys.modules["triton"] = None
    log.info("Mesa's LLVM is loaded (software OpenGL): torch will count without Triton, whose own LLVM would "
             "crash this process")
    return True


def run_count(request: CountRequest, progress: ProgressCallback | None = None,
              cancel: threading.Event | None = None) -> Path:
    """Count cells as `cellseg count` does and return the result folder (committed atomically).

    Loads the protocol and model bundle into a CellCounter as cli.count does, writes the region (if any) to
    a temporary TIFF, counts it into `staged_output(out)`. CellsegError for anything a user can
    fix; Cancelled when `cancel` was set (the previous result at `output`, if any, is left untouched).
    """
    keep_triton_out()          # before torch loads: see there
    from cellseg.detection import resolve_device
    from cellseg.planning import check_pixel_size, load_protocol
    from cellseg.results import RunInfo, staged_output
    from cellseg.run import CellCounter
    from cellseg.slides import open_slide

    from ._logic import write_region_tiff

    protocol = load_protocol(request.protocol).replace(model=request.model, channel=request.channel,
                                                      score_threshold=request.score_threshold)
    resolve_device(request.device)     # no GPU for --device cuda: said before any pixel is copied
    report = CancellableProgress(progress, cancel)
    name = re.sub(r"[^\w.-]+", "_", request.name).strip("._") or "image"
    temp_parent = None if request.output else Path(tempfile.mkdtemp(prefix="cellseg-napari-"))
    out = Path(request.output) if request.output else temp_parent / name
    work = Path(tempfile.mkdtemp(prefix="cellseg-napari-input-"))
    try:
        slide_path = request.slide
        if request.region is not None or slide_path is None:
            slide_path = work / f"{name}.ome.tif"
            if request.slide is not None:
                with open_slide(request.slide, series=request.series) as src:
                    box = request.region or Box(0, 0, src.info.height, src.info.width)
                    write_region_tiff(lambda b: src.read_region(b), box, slide_path, n_channels=src.info.n_channels,
                                      dtype=src.info.dtype, mpp=src.info.mpp, rgb=src.info.n_channels == 3
                                      and not src.info.channel_names, channel_names=src.info.channel_names)
            else:
                if request.read is None or request.shape is None:
                    raise CellsegError("expected a slide file or an image to read the pixels from, got neither")
                box = request.region or Box(0, 0, *request.shape)
                write_region_tiff(request.read, box, slide_path, n_channels=request.n_channels,
                                  dtype=request.dtype, mpp=request.mpp, rgb=request.n_channels == 3)
        else:
            box = None
        series = request.series if slide_path == request.slide else None     # a region's copy holds one image
        with open_slide(slide_path, mpp=request.mpp, series=series) as slide:   # cheap: a user mistake fails first
            check_pixel_size(protocol, slide.info)
        regions = None
        if request.regions is not None:
            regions = request_regions(request.regions, work, box)
            with open_slide(slide_path, mpp=request.mpp, series=series) as slide:     # none on it: said first
                regions.in_pixels(slide.info.mpp, slide.info.height, slide.info.width)
        report.check()
        counter = CellCounter.load(protocol, request.device, mpp=request.mpp, run_info=RunInfo(
            command=f"napari cellseg widget ({request.name})", extra={"interface": "napari", **request.extra}),
            regions=regions, series=series)
        with staged_output(out) as staging:
            counter.count_into(slide_path, staging, progress=report)
            if box is not None:
                # The counted image was a temporary copy: say where its pixels came from.
                region = {"slide": str(Path(request.slide).resolve()) if request.slide else None,
                          "series": request.series, "box_px": [int(v) for v in box], "source": request.name}
                (staging / REGION_FILE).write_text(json.dumps(region, indent=2), encoding="utf-8")
        return out
    except BaseException:
        if temp_parent is not None:
            shutil.rmtree(temp_parent, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def request_regions(geojson: dict, work: Path, box: Box | None):
    """The widget's regions (GeoJSON in the image's px) as cellseg.planning.regions.RegionFile, shifted onto the counted
    copy of `box` when only a box of the image is counted. Written to `work` first: read as any --regions file."""
    from dataclasses import replace

    from shapely import affinity

    from cellseg.planning import load_regions
    path = work / "regions.geojson"
    path.write_text(json.dumps(geojson), encoding="utf-8")
    regions = load_regions(path)
    if box is not None and (box.row0 or box.col0):
        regions = replace(regions, geometries=tuple(affinity.translate(g, -box.col0, -box.row0)
                                                    for g in regions.geometries))
    return regions

"""npe2 reader: a cellseg result folder (or its run.json) or a slide file, opened lazily.

`get_reader` only looks at the path (cheap, called for every file napari opens), and opens a TIFF, CZI or
OME-Zarr only to leave Z-stacks and time series to napari's own readers (which show their planes); the returned
function builds the layers with `_layers`, which never reads a whole slide.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cellseg.errors import CellsegError, StackError
from cellseg.slides import open_slide

from ._layers import LayerData, find_result_folder, is_slide_path, result_layer_data, slide_layer_data
from ._regions import regions_layer_data

STACK_SUFFIXES = (".tif", ".tiff", ".btf", ".czi", ".zarr")     # the formats that hold Z-stacks and time series


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(find_result_folder(p) is not None or is_slide_path(p) or is_regions_path(p)
                            for p in paths):
        return None
    if any(is_stack(p) for p in paths if find_result_folder(p) is None and not is_regions_path(p)):
        return None
    return read


def is_stack(path) -> bool:
    """A Z-stack or time series, which cellseg reads only as one plane or projection (--z) and napari's own
    readers show plane by plane: left to them. Opening is lazy (metadata only)."""
    if not str(path).lower().endswith(STACK_SUFFIXES) and not Path(path).is_dir():
        return False
    try:
        open_slide(path).close()
    except StackError:
        return True
    except CellsegError:    # another problem: the reader says it in one line
        return False
    return False


def is_regions_path(path) -> bool:
    """A GeoJSON file: regions (QuPath's exported annotations or any GIS tool's), shown as Shapes."""
    return str(path).lower().endswith(".geojson") and Path(path).is_file()


def read(path: str | list[str]) -> list[LayerData]:
    """Layers of each path: a result folder's slide, labels, cells and tissue mask, or a slide's image(s)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        if is_regions_path(p):
            layers.append(regions_layer_data(p))
        else:
            layers += result_layer_data(p) if find_result_folder(p) is not None else slide_layer_data(p)
    return layers

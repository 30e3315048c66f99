"""napari File > Open Sample: the example slides (shipped in the wheel as cellseg_napari.example_slides),
opened lazily like any slide."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ._layers import slide_layer_data


def example_slide(name: str) -> Path:
    """Path of a shipped example slide (from a wheel, or example_slides/ in a checkout)."""
    try:
        path = Path(str(resources.files("cellseg_napari.example_slides") / name))
    except ModuleNotFoundError:   # editable installs do not map the data-only folder; use the checkout's
        path = Path(__file__).resolve().parents[1] / "example_slides" / name
    if not path.is_file():
        raise FileNotFoundError(f"expected the example slide {name} in {path.parent}, found none")
    return path


def fluo_mosaic():
    return slide_layer_data(example_slide("fluo_mosaic.ome.tif"))


def he_mosaic():
    return slide_layer_data(example_slide("he_mosaic.ome.tif"))


def empty_regions():
    return slide_layer_data(example_slide("empty_regions.ome.tif"))


def he_patch():
    return slide_layer_data(example_slide("he_patch.png"))

"""Make docs/napari_screenshot.png: the plugin showing a real result on an example slide.

Counts the slide with the same function the widget runs (or takes an existing result folder), opens the
result through the plugin's reader, docks the widget with its cell table, colours the cells by area and
centres the view on one cell. Needs a display; on a headless machine:

    xvfb-run -a -s "-screen 0 1920x1200x24" python napari_plugin/make_screenshot.py
    xvfb-run -a -s "-screen 0 1920x1200x24" python napari_plugin/make_screenshot.py --model runs/nuclei
    xvfb-run -a -s "-screen 0 1920x1200x24" python napari_plugin/make_screenshot.py --slide example_slides/he_mosaic.ome.tif \
        --protocol he-nuclei --regions REGIONS.geojson --out docs/qupath_regions_napari.png

(The default model is the protocol's shipped bundle.)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=ROOT / "example_slides" / "fluo_mosaic.ome.tif")
    p.add_argument("--protocol", default="fluorescence-nuclei")
    p.add_argument("--model", default=None, help="model bundle folder (default: the protocol's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--result", type=Path, default=None, help="an existing result folder (skips counting)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "napari_screenshot.png")
    p.add_argument("--color-by", default="area_um2", help="cells.csv column to colour the cells by")
    p.add_argument("--regions", type=Path, default=None,
                   help="count only inside these regions (GeoJSON) and show them as Shapes over the cells")
    p.add_argument("--size", type=int, nargs=2, default=(1600, 1000), metavar=("W", "H"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from cellseg_napari._run import CountRequest, run_count
    result = args.result
    if result is None:
        from cellseg.cli import result_stem
        result = Path(tempfile.mkdtemp(prefix="cellseg-screenshot-")) / f"{result_stem(args.slide)}.cellseg"
        logging.info("counting %s (%s) ...", args.slide, args.protocol)
        import json
        regions = json.loads(args.regions.read_text()) if args.regions else None
        run_count(CountRequest(slide=args.slide, protocol=args.protocol, model=args.model, device=args.device,
                               output=result, name=args.slide.name, regions=regions),
                  progress=lambda done, total: logging.info("tile %d / %d", done, total))

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from cellseg_napari._widget import camera

    viewer = napari.Viewer(title="cellseg — napari", show=True)
    viewer.window._qt_window.resize(*args.size)
    layers = viewer.open(result, plugin="cellseg-toolkit")
    dock, widget = viewer.window.add_plugin_dock_widget("cellseg-toolkit", "Count cells")
    dock.setMinimumWidth(560)
    points = layers[-1]
    if args.regions is not None:
        viewer.open(args.regions, plugin="cellseg-toolkit")
    widget.cells_combo.setCurrentIndex(widget.cells_combo.findText(points.name))
    cells = points.features
    column = args.color_by if args.color_by in cells.columns and cells[args.color_by].notna().any() else "area_px"
    widget.color_combo.setCurrentText(column)
    for layer in layers:
        if layer.__class__.__name__ == "Labels":
            layer.opacity = 0.5
            viewer.layers.selection.active = layer
    points.visible = False
    if len(cells):
        # the middle of the busiest spot: the cell with the most neighbours within 150 px
        xy = cells[["centroid_row_px", "centroid_col_px"]].to_numpy()
        sample = np.arange(0, len(xy), max(1, len(xy) // 2000))
        target = int(sample[np.argmax([(np.hypot(*(xy - xy[i]).T) < 150).sum() for i in sample])])
        widget.select_row(int(np.flatnonzero(widget.model.positions == target)[0]))
        camera(viewer).zoom = 2.0 if args.regions is None else 0.8
    for _ in range(20):
        QApplication.processEvents()
    if len(cells):   # once laid out: show the coloured column beside the selected row
        widget.table.horizontalScrollBar().setValue(
            widget.table.columnViewportPosition(list(cells.columns).index(column))
            + widget.table.horizontalScrollBar().value() - 200)
    for _ in range(5):
        QApplication.processEvents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False, flash=False)
    logging.info("wrote %s (%d cells from %s)", args.out, len(cells), result)
    viewer.close()


if __name__ == "__main__":
    main()

"""Make docs/napari_correct_train.png: the widget's Correct & train tab after one turn of the loop.

Counts the H&E example slide with the protocol's model (or takes an existing result folder), opens the result,
draws two fields, corrects them (a split at a neck, a deletion, a painted nucleus, a merge), exports them as
COCO, fine-tunes the model on them for a few steps, recounts the region between them with the new bundle and takes
the screenshot: the same calls a user's clicks make (`CorrectPanel.edit_fields`, `split`, `export`, `train`,
`recount`). Needs a display; on a headless machine:

    xvfb-run -a -s "-screen 0 1920x1200x24" python napari_plugin/make_correct_screenshot.py
    xvfb-run -a -s "-screen 0 1920x1200x24" python napari_plugin/make_correct_screenshot.py --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# two fields of 160 x 200 px where the example's nuclei are many, and the region recounted between them, as
# (row0, col0, row1, col1) rectangles' corners
FIELDS = ((360, 40, 519, 239), (680, 120, 839, 319))
RECOUNT = (520, 40, 679, 319)


def wait(condition, timeout_s: float) -> None:
    from qtpy.QtWidgets import QApplication
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"still waiting after {timeout_s:.0f} s")
        QApplication.processEvents()
        time.sleep(0.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=ROOT / "example_slides" / "he_mosaic.ome.tif")
    p.add_argument("--protocol", default="he-nuclei")
    p.add_argument("--model", default=None, help="model bundle folder (default: the protocol's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--result", type=Path, default=None, help="an existing result folder of --slide (skips counting)")
    p.add_argument("--steps", type=int, default=4, help="training steps (a handful: the picture, not a model)")
    p.add_argument("--options", default="--batch-size 1", help="more cellseg train options")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "napari_correct_train.png")
    p.add_argument("--size", type=int, nargs=2, default=(1600, 1000), metavar=("W", "H"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="cellseg-correct-screenshot-"))

    from cellseg_napari._run import CountRequest, run_count
    result = args.result
    if result is None:
        from cellseg.cli import result_stem
        result = work / f"{result_stem(args.slide)}.cellseg"
        logging.info("counting %s (%s) ...", args.slide, args.protocol)
        run_count(CountRequest(slide=args.slide, protocol=args.protocol, model=args.model, device=args.device,
                               output=result, name=args.slide.name))

    import napari
    from qtpy.QtWidgets import QApplication

    from cellseg_napari._edit import labels_along
    from cellseg_napari._widget import camera

    viewer = napari.Viewer(title="cellseg — napari: correct, train, recount", show=True)
    viewer.window._qt_window.resize(*args.size)
    layers = viewer.open(result, plugin="cellseg-toolkit")
    slide = layers[0]
    dock, widget = viewer.window.add_plugin_dock_widget("cellseg-toolkit", "Count cells")
    dock.setMinimumWidth(520)
    panel = widget.correct
    widget.tabs.setCurrentWidget(panel)
    widget.protocol_combo.setCurrentText(args.protocol)
    widget.device_combo.setCurrentText(args.device)
    widget.model_edit.setText(args.model or "")
    fields = viewer.add_shapes([[[r0, c0], [r0, c1], [r1, c1], [r1, c0]] for r0, c0, r1, c1 in FIELDS],
                               shape_type="rectangle", name="fields", edge_color="yellow", edge_width=2,
                               face_color="transparent")
    widget.image_combo.setCurrentIndex(widget.image_combo.findText(slide.name))
    panel.fields_combo.setCurrentIndex(panel.fields_combo.findText(fields.name))
    first, second = panel.edit_fields()

    # corrections: split the largest nucleus of field 1 at its neck, delete its smallest, paint one in field 2
    ids, areas = np.unique(first.data[first.data > 0], return_counts=True)
    first.selected_label = int(ids[np.argmax(areas)])
    panel.split()
    first.selected_label = int(ids[areas >= 30][np.argmin(areas[areas >= 30])])
    panel.delete()
    viewer.layers.selection.active = second
    second.brush_size = 9
    second.paint((80, 100), int(second.data.max()) + 1)
    # a line across two neighbours of field 2, merged
    rows, cols = np.nonzero(second.data)
    lines = panel.lines_layer()
    start = np.array([rows.mean(), cols.mean()])
    for angle in np.linspace(0, np.pi, 12):
        end = start + 25 * np.array([np.sin(angle), np.cos(angle)])
        if len(labels_along(second.data, np.array([start, end]))) == 2:
            lines.add_lines(np.array([start, end]) + np.array(FIELDS[1][:2]))
            panel.merge()
            break
    panel.export_edit.setText(str(work / "corrections"))
    exported = panel.export()
    logging.info("exported %s", exported)

    panel.steps_spin.setValue(args.steps)
    panel.options_edit.setText(args.options)
    panel.train()
    wait(lambda: panel.worker is None, 3600)
    logging.info("training: %s %s", panel.outcome.status if panel.outcome else None, panel.status.text())
    status = panel.status.text()
    if panel.outcome is not None and panel.outcome.usable:
        r0, c0, r1, c1 = RECOUNT
        region = viewer.add_shapes([[[r0, c0], [r0, c1], [r1, c1], [r1, c0]]], shape_type="rectangle",
                                   name="recount region", edge_color="cyan", edge_width=2, face_color="transparent")
        widget.region_combo.setCurrentIndex(widget.region_combo.findText(region.name))
        panel.recount()
        wait(lambda: widget.worker is None, 1800)
    panel.status.setText(status + "\n" + widget.status.text())

    # the picture: the slide, the corrected fields, the recount between them (the first count's layers hidden)
    for layer in viewer.layers:
        kind = layer.metadata.get("cellseg", {}).get("kind")
        if kind in ("cells", "tissue", "cell_labels") or layer.name in (f"{slide.name} labels",):
            layer.visible = False
    viewer.layers.selection.active = first
    camera(viewer).center = (600, 180)
    camera(viewer).zoom = 1.5
    for _ in range(20):
        QApplication.processEvents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False, flash=False)
    logging.info("wrote %s", args.out)
    viewer.close()


if __name__ == "__main__":
    main()

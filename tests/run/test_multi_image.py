"""A file holding several images like the one counted (the positions of a multi-position acquisition in one
OME-TIFF): the count says, as it starts and first among the report's warnings, that only the first was counted."""

from __future__ import annotations

import json
import logging

import numpy as np
import tifffile

from cellseg.planning import Protocol

from ..helpers import LabelCounterSpec, random_cells

PROTOCOL = Protocol(name="test", tile_size=40, halo_px=10, batch_size=2, min_area_px=1, tissue_method="none")


def test_a_count_of_a_multi_position_file_says_only_the_first_position_was_counted(tmp_path, caplog):
    labels = random_cells(80, 90, max_diameter=10, n=60, seed=4)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    with tifffile.TiffWriter(tmp_path / "plate.ome.tif", ome=True) as tw:
        for k in range(2):
            tw.write(((labels > 0) * 150 + 10 * k).astype(np.uint8), metadata={"axes": "YX", "Name": f"A{k + 1}"})
    with caplog.at_level(logging.WARNING):
        summary = LabelCounterSpec(PROTOCOL, tmp_path / "labels.tif").load().count(tmp_path / "plate.ome.tif",
                                                                                   tmp_path / "out")
    said = ("plate.ome.tif holds 2 images like the one counted (OME images: A1, A2): only the first, A1, is counted; "
            "to count the others, save each as a file of its own (e.g. bfconvert -series N)")
    assert [r.getMessage() for r in caplog.records].count(said) == 1      # once, as the count starts
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["file_warnings"] == [said] and written["warnings"][0] == said == summary["warnings"][0]
    assert said in (tmp_path / "out" / "report.html").read_text()

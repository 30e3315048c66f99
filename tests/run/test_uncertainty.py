"""A count's uncertainty through the real pipeline (issue 48): p_nucleus in cells.csv, summary.json's count_estimate
and score_curve, regions.csv's estimate columns, below_threshold.csv; each below-threshold candidate counted once
whatever the tile size; a bundle without calibration still counts and says so."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellseg.bundles import write_toml
from cellseg.bundles.calibration import BundleCalibration, CountSpread, KeyCalibration, RecallTable, ScoreMap
from cellseg.planning import load_protocol
from cellseg.results import RunInfo

from ..helpers import LabelReadingDetector, count_with, random_cells

THRESHOLD = 0.5
SHA = "ab" * 32
CALIBRATION = KeyCalibration("fluorescence", ScoreMap((0.3, 0.5, 1.0), (0.1, 0.6, 0.9)),
                             RecallTable((0.3, 0.9), (0.2,), ((0.9, 0.8), (0.5, 0.4))),
                             CountSpread(0.01, 1.0, -1.6, 1.6), THRESHOLD)


class CandidateDetector(LabelReadingDetector):
    """The label image's nuclei (scores 0.5..1.0) plus fixed below-threshold candidates (slide boxes, score 0.4),
    each returned by every tile whose read box holds it whole."""

    def __init__(self, labels, candidates):
        super().__init__(labels, score=None)
        self.candidates = np.asarray(candidates, np.float32)

    def detect(self, images, tiles, scale=1.0):
        out = super().detect(images, tiles, scale)
        for det, tile in zip(out, tiles):
            r = tile.read
            inside = ((self.candidates[:, 0] >= r.row0) & (self.candidates[:, 2] <= r.row1)
                      & (self.candidates[:, 1] >= r.col0) & (self.candidates[:, 3] <= r.col1))
            below = self.candidates[inside].copy()
            below[:, [0, 2]] -= r.row0
            below[:, [1, 3]] -= r.col0
            det.below = below
        return out


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uncertainty")
    labels = random_cells(600, 700, 18, 400, seed=3)
    pixels = np.where(labels > 0, 200, 20).astype(np.uint8)
    tifffile.imwrite(folder / "slide.tif", pixels)
    # candidates on tile seams too (tiles of 256 and 512 px): each must be counted once
    candidates = [(r, c, r + 10, c + 12, 0.4) for r in (5, 250, 251, 400, 507) for c in (3, 255, 300, 510, 660)]
    bundle = folder / "bundle"
    bundle.mkdir()
    write_toml(bundle / "model.toml", {"format": "cellseg-bundle/1", "calibration": BundleCalibration(
        SHA, {"fluorescence": CALIBRATION}, "test calibration").to_dict()})
    return folder, labels, candidates, bundle


def _model(bundle, sha=SHA) -> dict:
    return {"name": "label reader", "path": str(bundle), "weights_sha256": sha,
            "score_thresholds": {"colour": THRESHOLD, "gray": THRESHOLD}}


@pytest.mark.parametrize("tile_size", [256, 512])
def test_count_estimate_curve_and_p_nucleus(slide, tmp_path, tile_size):
    folder, labels, candidates, bundle = slide
    protocol = load_protocol("fluorescence-nuclei").replace(tile_size=tile_size, halo_px=64)
    summary = count_with(CandidateDetector(labels, candidates), folder / "slide.tif", tmp_path / "out", protocol,
                         run_info=RunInfo(model=_model(bundle)))
    out = tmp_path / "out"
    cells = pd.read_csv(out / "cells.csv")
    np.testing.assert_allclose(cells["p_nucleus"], CALIBRATION.score_map(cells["score"]), atol=1e-5)
    est = summary["count_estimate"]
    density = cells["area_px"].sum() / (600 * 700)
    recall = CALIBRATION.recall(THRESHOLD, density)
    assert est["count"] == len(cells) == summary["cell_count"]
    assert est["expected_true_positives"] == pytest.approx(cells["p_nucleus"].sum(), abs=0.01)
    assert est["nuclear_area_fraction"] == pytest.approx(density, abs=1e-6)
    assert est["held_out_recall"] == pytest.approx(recall, abs=1e-4)
    assert est["estimated_true_count"] == pytest.approx(cells["p_nucleus"].sum() / recall, abs=0.01)
    assert est["interval_low"] < est["estimated_true_count"] < est["interval_high"]
    assert "estimate from validation data" in est["note"]
    curve = summary["score_curve"]
    counts = dict(zip(curve["thresholds"], curve["counts"]))
    scores = cells["score"].to_numpy(np.float32)
    for t in (0.5, 0.7, 0.9):
        assert counts[t] == np.count_nonzero(scores >= np.float32(t))
    assert counts[0.3] == counts[0.4] == len(cells) + len(candidates)     # every candidate once, any tile size
    assert counts[0.45] == len(cells)
    below = pd.read_csv(out / "below_threshold.csv")
    assert len(below) == len(candidates) and np.allclose(below["score"], 0.4, atol=1e-4)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["count_estimate"] == est and "warnings" in saved


def test_regions_get_their_estimates(slide, tmp_path, monkeypatch):
    from cellseg.planning import load_regions
    folder, labels, candidates, bundle = slide
    geojson = tmp_path / "regions.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": name},
         "geometry": {"type": "Polygon", "coordinates": [[[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]]}}
        for name, (r0, c0, r1, c1) in (("left", (0, 0, 600, 300)), ("right", (100, 400, 500, 700)))]}))
    summary = count_with(CandidateDetector(labels, candidates), folder / "slide.tif", tmp_path / "out",
                         load_protocol("fluorescence-nuclei"), run_info=RunInfo(model=_model(bundle)),
                         regions=load_regions(geojson, "px"))
    table = pd.read_csv(tmp_path / "out" / "regions.csv")
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    for row in table.itertuples():
        mine = cells[cells["region"].astype(str).str.contains(row.region)]
        assert row.expected_true_positives == pytest.approx(mine["p_nucleus"].sum(), abs=0.02)
        assert row.interval_low < row.estimated_true_count < row.interval_high
        assert "validation data" in row.estimate_note
    assert summary["count_estimate"]["count"] == len(cells)
    # the page lists them too: each region's cells and its estimate with the interval
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert '<h2 id="regions">Regions</h2>' in page and "Also in regions.csv" in page
    for row in table.itertuples():
        assert (f"<tr><td>{row.region}</td><td>{row.cells:,}</td>" in page
                and f"{round(row.estimated_true_count):,} ({round(row.interval_low):,}–{round(row.interval_high):,})"
                in page)
    from cellseg.results import report
    monkeypatch.setattr(report, "REGION_ROWS", 1)       # a slide of thousands of regions: the page lists the first
    report.write_report(tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "The first 1 of 2 regions" in page and page.count("<tr><td>right</td>") == 0
    # the curve counts only the candidates inside a region
    centres = [((r0 + r1) / 2, (c0 + c1) / 2) for r0, c0, r1, c1, _ in candidates]
    inside = sum(1 for r, c in centres if c + 0.5 < 300 or (100 <= r + 0.5 < 500 and 400 <= c + 0.5 < 700))
    assert summary["score_curve"]["counts"][0] == len(cells) + inside


@pytest.mark.parametrize("model, words", [(None, "no calibration in this bundle"),
                                          ("other weights", "fitted for other weights")])
def test_without_calibration_the_count_stands_alone(slide, tmp_path, model, words):
    folder, labels, candidates, bundle = slide
    record = None if model is None else _model(bundle, sha="cd" * 32)
    summary = count_with(CandidateDetector(labels, candidates), folder / "slide.tif", tmp_path / "out",
                         load_protocol("fluorescence-nuclei"), run_info=RunInfo(model=record))
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert "p_nucleus" in cells and cells["p_nucleus"].isna().all()
    assert summary["count_estimate"]["estimated_true_count"] is None
    assert words in summary["count_estimate"]["note"]
    assert summary["cell_count"] == len(cells) > 0


def test_below_threshold_candidates_travel_with_a_journaled_band(tmp_path):
    """--resume and Dask read bands back from the journal: each tile gets its own candidates again."""
    import dataclasses

    from cellseg.geometry import Band, Instances
    from cellseg.run.journal import load_band, save_band
    below = np.array([[1, 2, 11, 12, 0.41], [5, 5, 9, 9, 0.33]], np.float32)
    one = dataclasses.replace(Instances.empty(), below=below)
    two = Instances(np.array([[0, 0, 2, 2]]), [np.ones((2, 2), bool)], np.array([0.9], np.float32),
                    np.array([1]), np.array([4]), np.array([False]), np.array([[20, 20, 30, 30, 0.5]], np.float32))
    band = Band(0, 0, 1)
    save_band(tmp_path, band, {3: one, 4: two, 5: Instances.empty()})
    back = load_band(tmp_path, band)
    assert np.array_equal(back[3].below, one.below) and np.array_equal(back[4].below, two.below)
    assert len(back[5].below) == 0 and len(back[4]) == 1 and len(back[3]) == 0


# --------------------------------------------------------------------------- unlike anything validated (item 4)

class BlindDetector(LabelReadingDetector):
    """A detector that cannot see the slide's nuclei: of the label image it finds only every 40th nucleus, and
    scores it just over the threshold; the rest it scores under it (boxes only)."""

    def detect(self, images, tiles, scale=1.0):
        out = super().detect(images, tiles, scale)
        for det in out:
            keep = np.arange(len(det)) % 40 == 0
            below = np.concatenate([det.boxes[~keep].astype(np.float32),
                                    np.full((int((~keep).sum()), 1), 0.35, np.float32)], axis=1)
            det.boxes, det.scores, det.class_ids = det.boxes[keep], np.full(int(keep.sum()), 0.52, np.float32), \
                det.class_ids[keep]
            det.masks = [m for m, k in zip(det.masks, keep) if k]
            det.below = below
        return out


def test_a_slide_whose_nuclei_the_model_cannot_see_is_unlike_anything_validated(slide, tmp_path):
    """The bundle's appearance reference made of counts of slides like the test slide (other seeds); a new one of
    them does not warn, the same nuclei seen by a detector that cannot see them do."""
    from cellseg.bundles.appearance import BundleAppearance
    from cellseg.evaluation.appearance import fit_appearance
    from cellseg.results.appearance import appearance_features, feature_names
    folder, _, _, bundle = slide
    protocol = load_protocol("fluorescence-nuclei").replace(tile_size=256, halo_px=64)
    rows, names = [], feature_names(False)
    for seed in range(6):
        labels = random_cells(400, 500, 18, 150 + 40 * seed, seed=10 + seed)
        tifffile.imwrite(tmp_path / f"v{seed}.tif", np.where(labels > 0, 150 + 15 * seed, 20).astype(np.uint8))
        out = tmp_path / f"v{seed}.cellseg"
        summary = count_with(LabelReadingDetector(labels, score=None), tmp_path / f"v{seed}.tif", out, protocol,
                             run_info=RunInfo(model=_model(bundle)))
        run = json.loads((out / "run.json").read_text())
        features = appearance_features(summary, run, pd.read_csv(out / "cells.csv"))
        rows.append([features[n] for n in names])
    reference, report = fit_appearance(np.array(rows), [f"g{s}" for s in range(6)], ["test"] * 6, names)
    BundleAppearance(SHA, {"fluorescence": reference}, report).write(bundle)
    try:
        labels = random_cells(400, 500, 18, 230, seed=40)
        tifffile.imwrite(tmp_path / "new.tif", np.where(labels > 0, 190, 20).astype(np.uint8))
        seen = count_with(LabelReadingDetector(labels, score=None), tmp_path / "new.tif", tmp_path / "seen",
                          protocol, run_info=RunInfo(model=_model(bundle)))
        blind = count_with(BlindDetector(labels, score=None), tmp_path / "new.tif", tmp_path / "blind",
                           protocol, run_info=RunInfo(model=_model(bundle)))
        nothing = count_with(LabelReadingDetector(np.zeros_like(labels), score=None), tmp_path / "new.tif",
                             tmp_path / "nothing", protocol, run_info=RunInfo(model=_model(bundle)))
    finally:
        (bundle / "appearance.json").unlink()
    assert not seen["appearance"]["unlike"] and not any("unlike anything" in w for w in seen["warnings"])
    assert blind["appearance"]["unlike"] and blind["appearance"]["score"] > seen["appearance"]["score"]
    assert "unlike anything the model was validated on" in blind["warnings"][0]
    saved = json.loads((tmp_path / "blind" / "summary.json").read_text())
    assert saved["appearance"] == blind["appearance"] and saved["warnings"] == blind["warnings"]
    assert "unlike anything the model was validated on" in (tmp_path / "blind" / "report.html").read_text()
    # no nucleus found: the warning says so, and that an empty field gives it too (no score to quote)
    assert nothing["cell_count"] == 0 and nothing["appearance"]["unlike"] and nothing["appearance"]["nuclei"] == 0
    (warning,) = [w for w in nothing["warnings"] if "unlike anything" in w]
    assert warning.startswith("0 nuclei found") and "if it holds none, ignore this" in warning
    assert "appearance score" not in warning


def test_a_fluorescence_count_at_its_own_threshold_keeps_its_estimate(slide, tmp_path):
    """Every fluorescence slide is gray: a protocol's own score threshold reads the recall table at that threshold,
    while a gray brightfield slide, tuned apart from stained tissue, gets no stand-in."""
    from cellseg.results.uncertainty import count_calibration
    folder, labels, candidates, bundle = slide
    own = 0.7
    protocol = load_protocol("fluorescence-nuclei").replace(score_threshold=own)
    model = {**_model(bundle), "score_thresholds": {"colour": own, "gray": own}}
    summary = count_with(CandidateDetector(labels, candidates), folder / "slide.tif", tmp_path / "out", protocol,
                         run_info=RunInfo(model=model))
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    est = summary["count_estimate"]
    density = cells["area_px"].sum() / (600 * 700)
    assert est["threshold"] == own and est["calibration_key"] == "fluorescence"
    assert est["held_out_recall"] == pytest.approx(CALIBRATION.recall(own, density), abs=1e-4)

    gray_tuned = tmp_path / "gray-tuned"
    gray_tuned.mkdir()
    write_toml(gray_tuned / "model.toml", {
        "format": "cellseg-bundle/1", "inference": {"score_threshold_by_modality": {"brightfield_gray": 0.9}},
        "calibration": BundleCalibration(SHA, {"brightfield": CALIBRATION, "fluorescence": CALIBRATION},
                                         "test calibration").to_dict()})
    record = _model(gray_tuned)
    assert count_calibration(record, "brightfield", gray=False)[0].key == "brightfield"
    key, note = count_calibration(record, "brightfield", gray=True)
    assert key is None and "brightfield (gray input)" in note
    assert count_calibration(record, "fluorescence", gray=True)[0].key == "fluorescence"


def test_no_estimate_where_no_tissue_was_analysed(slide, tmp_path):
    """A region on glass (or a slide whose every tile the tissue prefilter skipped) holds 0 nuclei because nothing was
    looked at there: it got 'estimated true count 0 (90 % interval 0-2)', which reads as a measurement."""
    from cellseg.planning import load_regions
    folder, labels, candidates, bundle = slide
    pixels, labels = tifffile.imread(folder / "slide.tif"), labels.copy()
    pixels[:, 500:], labels[:, 500:] = 0, 0          # a band of glass on the right
    tifffile.imwrite(tmp_path / "slide.tif", pixels)
    geojson = tmp_path / "regions.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": name},
         "geometry": {"type": "Polygon", "coordinates": [[[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]]}}
        for name, (r0, c0, r1, c1) in (("cells", (0, 0, 600, 300)), ("glass", (100, 600, 500, 700)))]}))
    summary = count_with(CandidateDetector(labels, np.zeros((0, 5))), tmp_path / "slide.tif", tmp_path / "out",
                         load_protocol("fluorescence-nuclei").replace(tissue_method="otsu"),
                         run_info=RunInfo(model=_model(bundle)), regions=load_regions(geojson, "px"))
    cells, glass = pd.read_csv(tmp_path / "out" / "regions.csv").itertuples()
    assert glass.tissue_area_px == 0 and glass.cells == 0
    assert np.isnan(glass.estimated_true_count) and np.isnan(glass.interval_high)
    assert "no tissue was analysed" in glass.estimate_note
    assert cells.cells > 0 and cells.interval_low < cells.estimated_true_count < cells.interval_high
    assert summary["count_estimate"]["estimated_true_count"] is not None


def test_the_estimate_line_points_to_the_report_only_when_there_is_one(tmp_path, tiny_bundle):
    import hashlib
    import shutil

    from ..helpers import invoke

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    sha = hashlib.sha256((bundle / "weights.safetensors").read_bytes()).hexdigest()
    write_toml(tmp_path / "calibration.toml", {"calibration": BundleCalibration(
        sha, {"fluorescence": CALIBRATION}, "test calibration").to_dict()})
    with open(bundle / "model.toml", "a", encoding="utf-8") as f:      # the tiny bundle, calibrated
        f.write("\n" + (tmp_path / "calibration.toml").read_text(encoding="utf-8"))
    field = np.where(random_cells(128, 128, 8, 20, seed=1) > 0, 200, 20).astype(np.uint8)
    tifffile.imwrite(tmp_path / "field.tif", field)
    for outputs, how in (("cells.csv", "docs/uncertainty.md says how"), ("all", "report.html says how")):
        result = invoke(["count", str(tmp_path / "field.tif"), "-o", str(tmp_path / outputs), "--outputs", outputs,
                         "--model", str(bundle), "--tissue", "none", "--tile-size", "128", "-q"])
        assert result.exit_code == 0, result.output
        assert "estimated true count" in result.output and how in result.output

"""report.html: the slide report every count writes, `cellseg report`, the cohort report, and both rendered by a
real headless Chromium (skipped where it is not installed)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ..helpers import assert_user_error, invoke

_IMG = re.compile(r'<img[^>]*src="([^"]*)"')


def _images(page: str) -> list[str]:
    return _IMG.findall(page)


def _assert_self_contained(page: str) -> None:
    """Nothing fetched when the page is viewed: every picture inline, no external script, style or link."""
    assert all(src.startswith("data:image/png;base64,") for src in _images(page))
    assert not re.search(r'<(script|link|iframe)[^>]*(src|href)=', page)
    assert "http://" not in page and "https://" not in page


def test_every_result_folder_has_a_self_contained_report(he_result):
    page = (he_result / "report.html").read_text(encoding="utf-8")
    summary = json.loads((he_result / "summary.json").read_text())
    _assert_self_contained(page)
    assert f"{summary['cell_count']:,} cells" in page and summary["mpp_source"] in page
    assert "he-nuclei" in page
    # pictures: overlay, density map, 6-12 crops; charts (inline SVG): 4 histograms (nucleus, cell area: he-nuclei
    # grows cells; stain; score) and the count against the score threshold
    crops = page.count("<figcaption>")
    assert 6 <= crops <= 12 and len(_images(page)) == 2 + crops
    assert page.count('<svg class="chart"') == 4 + 1 and '<svg class="chart" id="score-curve"' in page
    assert 'id="estimate-line"' in page
    assert "densest tile" in page and "sparsest tissue tile" in page   # 6 tiles: all shown
    assert summary["warnings"] == []      # a clean slide: real pixel size, usual density, scores spread


def _time_rows(page: str) -> dict[str, str]:
    table = page.split("<h2>Time</h2>", 1)[1].split("</table>", 1)[0]
    return dict(re.findall(r"<tr><th>([^<]*)</th><td>([^<]*) s</td></tr>", table))


def test_the_counts_report_says_its_total_is_the_time_until_it_a_rebuilt_one_the_final_total(he_result, tmp_path):
    # a count writes its report before it ends: the page cannot show summary.json's final total, and says so
    rows = _time_rows((he_result / "report.html").read_text(encoding="utf-8"))
    final = json.loads((he_result / "summary.json").read_text())["seconds"]
    assert "total" not in rows and float(rows["total until this report"]) < final["total"]
    assert "report" in final and "report" not in rows
    folder = tmp_path / "a"
    shutil.copytree(he_result, folder)
    assert invoke(["report", folder]).exit_code == 0
    rebuilt = _time_rows((folder / "report.html").read_text(encoding="utf-8"))
    assert rebuilt["total"] == f"{final['total']}" and rebuilt["report"] == f"{final['report']}"


def test_a_one_tile_field_has_no_density_map(tmp_path):
    """A field no larger than a tile has one density, the slide's: the page says so instead of drawing one square."""
    import tifffile

    from ..helpers import EXAMPLES, oracle_result
    tifffile.imwrite(tmp_path / "field.tif", tifffile.imread(EXAMPLES / "fluo_mosaic.ome.tif")[:384, :448])
    tifffile.imwrite(tmp_path / "field_labels.tif", tifffile.imread(EXAMPLES / "fluo_mosaic_labels.tif")[:384, :448])
    folder = oracle_result(tmp_path / "field.tif", tmp_path / "field_labels.tif", tmp_path / "field.cellseg")
    page = (folder / "report.html").read_text(encoding="utf-8")
    _assert_self_contained(page)
    assert 'id="heatmap"' not in page and "is one tile of" in page
    assert 'id="overlay"' in page and "<figcaption>" in page     # the overlay and the crop are still there


@pytest.mark.parametrize("threshold, scores, warned", [
    (0.9, [0.96, 0.98, 0.99, 0.985, 0.97], False),     # a gray brightfield's threshold: every score is within 0.1
    (0.9, [0.91, 0.92, 0.93, 0.99, 0.94], True),
    (0.5, [0.52, 0.55, 0.58, 0.9, 0.95], True),
])
def test_the_near_threshold_warning_needs_scores_crowding_the_threshold(threshold, scores, warned):
    import pandas as pd

    from cellseg.results import slide_warnings
    summary = {"mpp": 0.5, "mpp_source": "ome", "cells_per_mm2": 2000.0, "area_px": {"median": 300.0},
               "scale": {"factor": 1.0, "model_diameter_px": 20.0}}
    warnings = slide_warnings(summary, {"model": {"score_threshold": threshold}},
                              pd.DataFrame({"score": scores}), None)
    assert any("of the threshold" in w for w in warnings) == warned, warnings


def test_warnings_say_why_a_number_may_be_wrong():
    import pandas as pd

    from cellseg.results import TileGrid, slide_warnings
    summary = {"mpp": None, "mpp_source": "none: no resolution tags", "cells_per_mm2": None,
               "area_px": {"median": 3000.0}, "scale": {"factor": 1.0, "model_diameter_px": 12.0},
               "unreadable": [{"box": [0, 0, 64, 64], "level": 0, "error": "x"}], "unreadable_area_px": 4096}
    cells = pd.DataFrame({"score": np.full(10, 0.52)})
    warnings = " | ".join(slide_warnings(summary, {"model": {"score_threshold": 0.5}}, cells, None))
    for words in ("pixel size assumed", "training size", "of the threshold", "unreadable region"):
        assert words in warnings, (words, warnings)
    good = {"mpp": 0.5, "mpp_source": "ome", "cells_per_mm2": 3000.0, "area_px": {"median": 113.0},
            "scale": {"factor": 1.0, "model_diameter_px": 12.0}}
    spread = pd.DataFrame({"score": np.linspace(0.5, 1.0, 10)})
    assert slide_warnings(good, {"model": {"score_threshold": 0.5}}, spread, None) == []
    assert "unusual density" in slide_warnings({**good, "cells_per_mm2": 50.0}, {}, spread, None)[0]
    # tissue in tiles skipped as background: 100 tiles each just under the minimum share, one analysed tile
    tissue = np.full((10, 11), 0.009)
    tissue[0, 0] = 1.0
    counts = np.zeros((10, 11))
    counts[0, 0] = 40
    grid = TileGrid(512, 10, 11, counts, np.zeros_like(counts), tissue, np.zeros_like(counts))
    warnings = slide_warnings({**good, "min_tissue_fraction": 0.01}, {}, spread, grid)
    assert len(warnings) == 1 and "skipped as background" in warnings[0]
    assert slide_warnings({**good, "min_tissue_fraction": 0.005}, {}, spread, grid) == []


@pytest.mark.slow
def test_report_command_rebuilds_slide_and_cohort_reports(he_result, tmp_path):
    results = tmp_path / "results"
    for name in ("a", "b"):
        shutil.copytree(he_result, results / name)
        (results / name / "report.html").unlink()
    result = invoke(["report", results])
    assert result.exit_code == 0, result.output
    for name in ("a", "b"):
        _assert_self_contained((results / name / "report.html").read_text(encoding="utf-8"))
    cohort = (results / "report.html").read_text(encoding="utf-8")
    _assert_self_contained(cohort)
    assert 'href="a/report.html"' in cohort and 'href="b/report.html"' in cohort
    assert cohort.count("<tr>") == 3 and "sortable" in cohort

    one = invoke(["report", results / "a"])     # one result folder: its report only
    assert one.exit_code == 0 and "cohort" not in one.output and "report of" not in one.output


def test_report_command_never_replaces_a_report_html_it_did_not_write(he_result, tmp_path):
    results = tmp_path / "results"
    for name in ("a", "b"):
        shutil.copytree(he_result, results / name)
    (results / "report.html").write_text("<html>my notes</html>")
    slide_pages = {name: (results / name / "report.html").stat().st_mtime_ns for name in ("a", "b")}
    result = invoke(["report", results / "a", results / "b"])
    assert_user_error(result, 1, "expected", "report.html", "to be absent or a cellseg cohort report",
                      "found another file")
    assert (results / "report.html").read_text() == "<html>my notes</html>"
    # refused before any slide's page was rebuilt
    assert {name: (results / name / "report.html").stat().st_mtime_ns for name in ("a", "b")} == slide_pages


def test_report_of_folders_without_what_the_page_is_drawn_from(he_result, tmp_path):
    """A count with --outputs cells.csv wrote no overlay.png: one line for it; in a cohort the others' pages are
    drawn and the cohort lists it with why; a folder named twice is one slide."""
    results = tmp_path / "results"
    for name in ("a", "b", "c"):
        shutil.copytree(he_result, results / name)
    (results / "b" / "overlay.png").unlink()
    assert_user_error(invoke(["report", results / "b"]), 1, "expected overlay.png in", "to draw its report")
    result = invoke(["report", results, results / "a"])
    assert result.exit_code == 1 and "1 of 3 reports could not be drawn" in result.stderr
    assert "report of 3 results" in result.stdout                    # a, b (its error), c: a not twice
    cohort = (results / "report.html").read_text(encoding="utf-8")
    assert "expected overlay.png in" in cohort and cohort.count('href="a/report.html"') == 1


def test_a_rebuilt_cohort_report_keeps_the_inputs_the_count_failed(he_result, tmp_path):
    """summary.csv of a count of several slides lists an input that failed (no result folder): the rebuilt cohort
    page lists it with its error, as the count's did, until a result folder for it is there."""
    from cellseg.cli import _SUMMARY_COLUMNS
    results = tmp_path / "results"
    for name in ("a", "b"):
        shutil.copytree(he_result, results / name)
    with open(results / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows([{"input": "/data/a.tif", "status": "ok", "result": results / "a"},
                          {"input": "/data/b.tif", "status": "ok", "result": results / "b"},
                          {"input": "/data/c.ome.tif", "status": "error",
                           "error": "expected a TIFF file, found 12 bytes"}])
    result = invoke(["report", results])
    assert result.exit_code == 0, result.output
    assert "report of 3 results" in result.stdout
    cohort = (results / "report.html").read_text(encoding="utf-8")
    assert "c.ome.tif" in cohort and "expected a TIFF file, found 12 bytes" in cohort

    shutil.copytree(he_result, results / "c")           # counted again since, on its own
    result = invoke(["report", results])
    assert result.exit_code == 0 and "report of 3 results" in result.stdout
    assert "expected a TIFF file" not in (results / "report.html").read_text(encoding="utf-8")


def test_report_of_a_folder_without_results_is_one_line(tmp_path):
    assert_user_error(invoke(["report", tmp_path]), 1, "result folder", str(tmp_path))


@pytest.mark.slow
def test_crops_left_out_when_the_slide_is_gone(he_result, tmp_path):
    folder = tmp_path / "moved"
    shutil.copytree(he_result, folder)
    run = json.loads((folder / "run.json").read_text())
    run["slide"] = str(tmp_path / "gone.ome.tif")
    (folder / "run.json").write_text(json.dumps(run))
    assert invoke(["report", folder]).exit_code == 0
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "crops left out" in page and "<figcaption>" not in page


def test_the_report_waits_for_the_label_images_only_before_its_crops(he_result, tmp_path):
    """A count draws the report while labels.ome.tif is still being written: write_report calls `label_images`
    once, after the pictures and before it reads the crops from labels.ome.tif."""
    from cellseg.results import write_report
    folder = tmp_path / "writing"
    shutil.copytree(he_result, folder)
    (folder / "labels.ome.tif").rename(tmp_path / "labels.ome.tif")     # "still being written"
    calls = []

    def label_images():
        calls.append((folder / "report.html").exists())
        (tmp_path / "labels.ome.tif").rename(folder / "labels.ome.tif")
    (folder / "report.html").unlink()
    write_report(folder, label_images=label_images)
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert calls == [False] and "crops left out" not in page and page.count("<figcaption>") >= 6


# --------------------------------------------------------------------------- a real browser

_CHECK = """<script>window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  var charts = Array.from(document.querySelectorAll("svg.chart"));
  var blank = charts.filter(function (c) { var b = c.getBBox(); return !(b.width > 0 && b.height > 0); }).length;
  document.body.setAttribute("data-check", imgs.length + " " + broken + " " + charts.length + " " + blank);
});</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless Chromium is not installed (apt-get install chromium): the reports are not rendered")


def render(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Chromium headless on `page`, offline (no background networking), console messages on stderr."""
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=10000", *extra, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)


def assert_renders(page: Path, tmp_path: Path) -> tuple[int, int]:
    """The page loads in Chromium with no console message, every <img> decoded and every chart (inline SVG) drawn
    with a size; returns the counts of images and charts."""
    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    done = render(probe, tmp_path / f"profile-{page.parent.name}", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    check = re.search(r'data-check="(\d+) (\d+) (\d+) (\d+)"', done.stdout)
    assert check is not None, "the page's load event never ran"
    images, broken, charts, blank = map(int, check.groups())
    assert images + charts > 0 and broken == 0 and blank == 0, (images, broken, charts, blank)
    probe.unlink()
    return images, charts


def test_reports_render_in_headless_chromium(he_result, tmp_path):
    chromium()
    results = tmp_path / "results"
    for name in ("he_a", "he_b"):
        shutil.copytree(he_result, results / name)
    assert invoke(["report", results]).exit_code == 0
    images, charts = assert_renders(results / "he_a" / "report.html", tmp_path)
    assert images >= 8 and charts == 5           # overlay, density map, crops; 4 histograms, the score curve
    assert assert_renders(results / "report.html", tmp_path) == (0, 1)       # the cohort's density per slide


def test_the_browser_check_can_fail(tmp_path):
    chromium()
    page = tmp_path / "bad" / "report.html"
    page.parent.mkdir()
    page.write_text('<html><body><img src="data:image/png;base64,AAAA"></body></html>')
    with pytest.raises(AssertionError):
        assert_renders(page, tmp_path)
    page.write_text('<html><body><img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAA'
                    'CklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="><script>console.error("x")</script></body></html>')
    with pytest.raises(AssertionError, match="CONSOLE"):
        assert_renders(page, tmp_path)
    page.write_text('<html><body><svg class="chart" width="50" height="50"></svg></body></html>')     # nothing drawn
    with pytest.raises(AssertionError):
        assert_renders(page, tmp_path)
    page.write_text('<html><body><svg class="chart" width="50" height="50"><rect width="9" height="9"/></svg>'
                    '</body></html>')
    assert assert_renders(page, tmp_path) == (0, 1)


def test_crops_densest_sparsest_seam_cut_then_seeded_random():
    from cellseg.results import MAX_CROPS, TileGrid, choose_crops, tile_densities
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 50, (8, 9)).astype(float)
    cut = np.zeros_like(counts)
    cut[7, 8] = 5                    # the tile with most seam-cut cells
    tissue = np.ones_like(counts)
    tissue[0, :] = 0.05              # too little tissue for a density
    unreadable = np.zeros_like(counts)
    unreadable[3, 3] = 0.5           # half the tile unreadable: its density is over the other half
    grid = TileGrid(100, 8, 9, counts, cut, tissue, unreadable)
    summary = {"height_px": 800, "width_px": 900, "mpp": 0.5}
    density, unit = tile_densities(grid, summary)
    assert unit == "cells per mm² of tissue" and np.isnan(density[0]).all()
    assert density[3, 3] == pytest.approx(counts[3, 3] / (100 * 100 * 0.5 * 0.25 / 1e6))
    chosen = choose_crops(grid, density)
    assert chosen == choose_crops(grid, density)          # seeded
    tiles = [rc for rc, _ in chosen]
    assert len(tiles) == len(set(tiles)) == 3 + 3 + 1 + 3 <= MAX_CROPS    # one tile has seam-cut cells
    finite = np.where(np.isfinite(density), density, -1)
    assert tiles[0] == tuple(np.unravel_index(np.argmax(finite), density.shape))
    assert (7, 8) in tiles and dict(chosen)[(7, 8)] in ("many cells cut at a seam", "densest tile",
                                                        "sparsest tissue tile")
    assert all(rc[0] != 0 for rc in tiles)               # no tile without enough tissue


# --------------------------------------------------------------------------- the count's uncertainty (issue 48)

def test_density_map_colours_each_tile_over_the_picture_and_its_scale_spans_the_densities():
    """Each tile's square takes magma at the density's place in the range, blended over the picture; tiles without a
    density keep the picture; the page's colour bar has round ticks inside the range."""
    from imagecodecs import png_decode
    from matplotlib import colormaps

    from cellseg.results.report_plots import HEATMAP_ALPHA, density_scale, heatmap_png
    picture = np.full((60, 90, 3), 200, np.uint8)
    picture[:, 45:] = 40
    density = np.array([[0.0, 500.0, np.nan], [1000.0, 250.0, 750.0]])
    # a 300 x 400 px slide in 150 px tiles: a tile is 30 px of the 60 x 90 picture's rows, ~34 of its columns; the
    # last column of tiles overhangs the slide
    shown = png_decode(heatmap_png(picture, density, 300, 400, 150))
    assert shown.shape == picture.shape
    for (r, c), value in np.ndenumerate(density):
        at = shown[30 * r + 15, 34 * c + 10 if c < 2 else 80]
        under = picture[30 * r + 15, 34 * c + 10 if c < 2 else 80].astype(float)
        if np.isnan(value):
            assert (at == under).all()
        else:
            want = under * (1 - HEATMAP_ALPHA) + np.array(colormaps["magma"](value / 1000)[:3]) * 255 * HEATMAP_ALPHA
            assert np.abs(at - want).max() <= 1, (r, c, at, want)
    scale = density_scale(density)
    assert (scale["low"], scale["high"]) == (0.0, 1000.0)
    assert [v for v, _ in scale["ticks"]] == [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]
    assert [at for _, at in scale["ticks"]] == [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
    assert density_scale(np.full((2, 2), np.nan)) is None


def test_histogram_chart_draws_the_bins_the_median_and_the_marks_where_they_hide_no_bar():
    from cellseg.results.report_plots import histogram_chart
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(50, 5, 900), [np.nan, np.inf]]        # non-finite values dropped
    chart = histogram_chart(values, "nucleus area (µm²)", "Nucleus area", {"threshold": 60.0, "none": None})
    assert chart.title == "Nucleus area (n = 900)" and chart.note is None
    left, top, right, bottom = chart.plot
    # the bars as one outline from the axis up and back; its highest point is the tallest bin, near the top
    d = chart.areas[0]["d"]
    ys = [float(p.split(",")[1]) for p in d[1:-1].replace("M", "L").split("L")]
    assert ys[0] == ys[-1] == bottom and top <= min(ys) < top + 0.1 * (bottom - top)
    labels = [e["label"] for e in chart.legend]
    assert labels == [f"median {np.median(values[:900]):.4g}", "threshold"]
    median_x = float(chart.lines[0]["points"].split()[0].split(",")[0])
    (x0, _), (x1, _) = chart.x_ticks[0], chart.x_ticks[-1]
    assert left <= x0 < median_x < x1 <= right
    assert all(left <= at <= right for at, _ in chart.x_ticks) and all(top <= at <= bottom for at, _ in chart.y_ticks)
    assert chart.y_ticks[0][1] == "0" and chart.y_ticks[0][0] == bottom      # counts from 0, thousands with commas
    # a normal hump in the middle: the legend goes in a top corner, clear of the bars
    lx, ly, lw, lh = chart.legend_at
    assert ly == top + 6 and (lx + lw < median_x - 60 or lx > median_x + 60)
    empty = histogram_chart(np.zeros(0), "x", "Scores")
    assert empty.note == "no cells" and empty.areas == [] and empty.title == "Scores (n = 0)"


def test_score_curve_chart_is_solid_at_and_above_the_threshold_and_shows_the_estimate():
    from cellseg.results.report_plots import score_curve_chart
    curve = {"thresholds": [0.3, 0.4, 0.5, 0.6, 0.7], "counts": [1500, 1300, 1200, 1000, 600], "threshold": 0.5}
    estimate = {"estimated_true_count": 1400.0, "interval_low": 1100.0, "interval_high": 1900.0,
                "interval_level": 0.9}
    chart = score_curve_chart(curve, estimate)
    solid = [line for line in chart.lines if line["dash"] is None]
    dashed_blue = [line for line in chart.lines if line["dash"] == "6 4" and line["stroke"] == "#4878a8"]
    assert len(solid) == 1 and len(solid[0]["points"].split()) == 3           # 0.5, 0.6, 0.7
    assert len(dashed_blue) == 1 and len(dashed_blue[0]["points"].split()) == 3      # 0.3, 0.4 joined to 0.5
    assert sum(m["fill"] == "white" for m in chart.markers) == 2 and len(chart.markers) == 5
    left, top, right, bottom = chart.plot
    band = chart.bands[0]
    assert top <= band["y"] < band["y"] + band["height"] < bottom        # 1100..1900 of an axis to ~2,000
    assert [e["label"] for e in chart.legend] == ["nuclei kept", "estimated true count, 90% interval",
                                                  "with detections under the threshold", "threshold 0.50"]
    assert score_curve_chart({"thresholds": [], "counts": [], "threshold": None}).note == "no score curve"


def test_density_bars_chart_has_a_slot_per_slide_and_room_for_their_names():
    from cellseg.results.report_plots import CHART_WIDTH, density_bars_chart
    names = ["a", "b" * 60, "c"]
    chart = density_bars_chart(names, [1000.0, None, 250.0], "cells per mm² of tissue")
    assert [label for _, label in chart.x_ticks] == ["a", "b" * 40 + "…", "c"]
    assert chart.areas[0]["d"].count("M") == 2                 # no bar for the slide without a density
    left, top, right, bottom = chart.plot
    assert chart.height - bottom > 0.87 * 6 * 40 and left >= 0.5 * 6 * 40 - 14     # the 60-degree names fit
    many = density_bars_chart([f"s{k}" for k in range(100)], list(np.linspace(1, 2, 100)), "x")
    assert many.width > 100 * 28 > CHART_WIDTH and len(many.x_ticks) == 100
    assert density_bars_chart(["a"], [None], "x").note == "no slide with a density"


def test_curve_warning_when_the_count_moves_with_the_threshold():
    from cellseg.results import CURVE_THRESHOLDS, curve_warning
    t = list(CURVE_THRESHOLDS)
    counts = [2000 - 50 * k for k in range(len(t))]             # 50 nuclei per step: ~3 % of ~1,700
    steady = {"thresholds": t, "counts": counts, "threshold": 0.65, "below_threshold_kept": True}
    assert curve_warning(steady) is None
    jump = dict(steady, counts=counts[:8] + [c - 400 for c in counts[8:]])       # 0.65 -> 0.7 loses 400 of 1,650
    words = curve_warning(jump)
    assert words is not None and "moves" in words and "0.65" in words and "0.70" in words
    tiny = dict(steady, counts=[30, 29, 28, 27, 26, 25, 24, 20, 18, 17, 16, 15, 14])   # 20 % but 4 nuclei
    assert curve_warning(tiny) is None
    assert curve_warning(dict(jump, below_threshold_kept=False)) is None           # TTA: no curve under it
    assert curve_warning(dict(jump, threshold=None)) is None


def test_report_shows_the_estimate_the_curve_and_crops_near_the_threshold(he_result, tmp_path):
    """A slide whose count moves with the threshold: the warning, and crops of kept and not-kept detections near it."""
    import pandas as pd

    from cellseg.results import write_report
    folder = tmp_path / "moved"
    shutil.copytree(he_result, folder)
    summary = json.loads((folder / "summary.json").read_text())
    cells = pd.read_csv(folder / "cells.csv")
    t = [round(0.3 + 0.05 * k, 2) for k in range(13)]
    summary["score_curve"] = {"thresholds": t, "threshold": 0.9, "below_threshold_kept": True, "note": "test",
                              "counts": [int((cells["score"] >= x - 1e-6).sum()) + (60 if x < 0.9 else 0) for x in t]}
    summary["count_estimate"] = {"count": len(cells), "expected_true_positives": 230.5, "estimated_missed": 20.25,
                                 "estimated_true_count": 250.75, "interval_low": 201.0, "interval_high": 312.0,
                                 "interval_level": 0.9, "held_out_recall": 0.919, "nuclear_area_fraction": 0.12,
                                 "threshold": 0.9, "calibration_key": "brightfield", "calibration": "test map",
                                 "note": "an estimate from validation data"}
    (folder / "summary.json").write_text(json.dumps(summary))
    below = cells[cells["score"] < 0.9].head(5)      # stand-ins for detections just under the threshold
    pd.DataFrame({"row0_px": below["bbox_row0_px"], "col0_px": below["bbox_col0_px"], "row1_px": below["bbox_row1_px"],
                  "col1_px": below["bbox_col1_px"], "score": 0.87}).to_csv(folder / "below_threshold.csv", index=False)
    warnings = write_report(folder)
    page = (folder / "report.html").read_text(encoding="utf-8")
    _assert_self_contained(page)
    assert any("moves" in w for w in warnings)
    assert "Estimated true count <strong>251</strong>" in page and "interval 201–312" in page
    assert 'id="score-curve"' in page and "How sure is the count" in page
    near = page.count('<figure class="near">')
    assert near == 6 and page.count("not kept at the threshold 0.90") == 3 and page.count("kept at the threshold") == 6
    assert json.loads((folder / "summary.json").read_text())["warnings"] == warnings
    if shutil.which("chromium"):
        images, charts = assert_renders(folder / "report.html", tmp_path)
        assert images >= 2 + 6 + 6 and charts == 5     # overlay, density map, crops near the threshold, crops


def test_a_count_in_regions_gives_the_tissue_its_density_is_per(he_result, tmp_path):
    """With --regions cells_per_mm2 is per mm² of the tissue inside them: the pages gave the whole slide's tissue
    beside it (240 cells, 8,407 per mm², 0.0548 mm² of tissue)."""
    results = tmp_path / "results"
    folder = results / "a"
    shutil.copytree(he_result, folder)
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(regions=[{"region": "Tumor", "cells": 40}, {"region": "Stroma", "cells": 10}],
                   tissue_area_in_regions_px=80000, tissue_area_in_regions_mm2=0.005, cells_per_mm2=10000.0)
    (folder / "summary.json").write_text(json.dumps(summary))
    shutil.copytree(folder, results / "b")
    assert invoke(["report", results]).exit_code == 0
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "in 2 region(s)" in page and "per mm² of tissue in them" in page
    assert re.search(r"<th>tissue area in the regions</th><td>0.005 mm² \(80,000 px", page)
    assert "<th>tissue area of the slide</th>" in page
    cohort = (results / "report.html").read_text(encoding="utf-8")
    assert cohort.count('<td data-value="0.005">0.005 in regions</td>') == 2

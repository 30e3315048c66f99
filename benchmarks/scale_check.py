"""Scale: the same fields at another magnification must give the same count (issue 51; not part of the test suite).

Two sets, each counted at 1x and resampled to 0.5x, 0.75x (a 20x or 30x scan of a 40x one: area-averaged) and 2x
(upsampled, bilinear), the pixel size written into each copy's OME metadata (the original's divided by the factor):

- the example mosaic (fluorescence, nominal 0.5 µm/px) with `-p fluorescence-nuclei`;
- the held-out TNBC H&E fields (the patients whose groups have side "val" in the shipped bundle's split.json; 40x,
  0.25 µm/px), each field an OME-TIFF of its own, with `-p he-nuclei`.

Each copy is counted with `--diameter MODE` for each MODE asked (default: `default`, what `cellseg count` does with
no --diameter, and `native`, what it did before issue 51: no resampling), the model loaded once. Printed per set,
mode and magnification: cells (summed over the fields), the count's difference to the 1x count of that mode, AP50
(TP / (TP + FP + FN) at IoU 0.5, pooled over the fields) against the ground truth resampled the same way (nearest
neighbour) and its difference to 1x; "AP50 at 1x": the same with the copy's nuclei mapped back onto the original's
size (nearest neighbour) against the original ground truth (a nucleus of 9 px is 4-5 px at 0.5x, where the
resampled ground truth itself is too coarse to match a mask at IoU 0.5), and its difference to 1x; the median over
the fields of the count's error against the ground truth, the scales chosen (network px per slide px) and seconds. Goal: within 3 % count
and 0.03 AP50 of 1x at every magnification.

`--truth coverage`: the ground truth resampled as the pixels are (each nucleus's share of every output pixel, kept
where at least half) instead of by nearest neighbour; at 0.5x the mosaic's AP50 depends on this more than on the
scale (docs/pipeline.md, "Scale").

`--mpp-error X`: every copy's pixel size written X times off (wrong metadata), to see the check catch it.

`--timing N`: the cost of the default scale step on the example mosaic: `cellseg count` run N times with no
--diameter and N times with `--diameter native`, interleaved, as processes (their wall time, imports and model load
included); the medians and their difference. Goal: <= 5 % of the wall time.

    python benchmarks/scale_check.py [--sets mosaic,tnbc] [--mags 1,0.5,0.75,2] [--modes default,native]
                                     [--mpp-error 2] [--timing 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TNBC = ROOT.parent / "shared" / "data" / "tnbc-train"
MOSAIC = ROOT / "example_slides" / "fluo_mosaic.ome.tif"


def resample(image: np.ndarray, factor: float, labels: bool = False, truth: str = "nearest") -> np.ndarray:
    """`image` (h, w[, C]) at `factor` times its size: pixels area-averaged when shrinking (a scanner at lower
    magnification) and bilinear when enlarging; labels by nearest neighbour, or (truth "coverage") as the pixels
    are (resample_labels)."""
    from skimage.transform import resize
    shape = (round(image.shape[0] * factor), round(image.shape[1] * factor)) + image.shape[2:]
    if factor == 1:
        return image
    if labels:
        if truth == "coverage":
            return resample_labels(image, factor, shape)
        return resize(image, shape, order=0, preserve_range=True, anti_aliasing=False).astype(image.dtype)
    out = resize(image.astype(np.float32), shape, order=1, anti_aliasing=factor < 1, preserve_range=True)
    return np.clip(np.round(out), 0, np.iinfo(image.dtype).max).astype(image.dtype)


def resample_labels(labels: np.ndarray, factor: float, shape: tuple[int, int]) -> np.ndarray:
    """The ground truth as the resampled pixels show it: each nucleus's mask resampled as the pixels are (its share of
    every output pixel), a pixel given to the nucleus covering most of it when that is at least half. Nearest
    neighbour instead samples one source pixel in four at 0.5x, half a source pixel off the area-averaged image's
    pixel centres: on nuclei of 4-5 px that moves IoU by more than the scale does. Each nucleus is resampled in a
    crop whose edges lie on the scale's grid (factor = p/q: multiples of q source px), so the crop resamples exactly
    as the whole image would."""
    from fractions import Fraction

    from skimage.measure import regionprops
    from skimage.transform import resize
    q = Fraction(factor).limit_denominator(16).denominator
    height, width = labels.shape[:2]
    out = np.zeros(shape[:2], labels.dtype)
    best = np.zeros(shape[:2], np.float32)
    margin = 4 * q + int(np.ceil(4 / min(factor, 1)))     # beyond the smoothing's reach, on the grid
    margin += (-margin) % q
    for region in regionprops(labels):
        r0, c0, r1, c1 = region.bbox
        a0, b0 = max(0, (r0 - margin) // q * q), max(0, (c0 - margin) // q * q)
        a1, b1 = min(height, -(-(r1 + margin) // q) * q), min(width, -(-(c1 + margin) // q) * q)
        o0, p0 = round(a0 * factor), round(b0 * factor)
        o1, p1 = (shape[0] if a1 == height else round(a1 * factor)), (shape[1] if b1 == width else round(b1 * factor))
        share = resize((labels[a0:a1, b0:b1] == region.label).astype(np.float32), (o1 - o0, p1 - p0), order=1,
                       anti_aliasing=factor < 1, preserve_range=True)
        window = best[o0:o1, p0:p1]
        take = (share >= 0.5) & (share > window)
        window[take] = share[take]
        out[o0:o1, p0:p1][take] = region.label
    return out


def to_shape(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A label image resampled to `shape` by nearest neighbour (a copy's nuclei mapped back onto the original)."""
    from skimage.transform import resize
    return resize(labels, shape, order=0, preserve_range=True, anti_aliasing=False).astype(labels.dtype)


def write_field(path: Path, pixels: np.ndarray, mpp: float) -> None:
    import tifffile
    gray = pixels.ndim == 2 or pixels.shape[-1] == 1
    tifffile.imwrite(path, pixels.reshape(pixels.shape[:2]) if gray else pixels, tile=(256, 256), compression="zlib",
                     metadata={"axes": "YX" if gray else "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})


def fields(name: str) -> tuple[str, list[tuple[str, np.ndarray, np.ndarray, float]]]:
    """(protocol, [(field name, pixels, labels, µm per px)]) of a set."""
    import tifffile
    from PIL import Image

    from cellseg.geometry import Box
    from cellseg.slides import open_slide
    if name == "mosaic":
        with open_slide(MOSAIC) as slide:
            pixels = slide.read_region(Box(0, 0, slide.info.height, slide.info.width))
            mpp = slide.info.mpp
        return "fluorescence-nuclei", [("fluo_mosaic", pixels, tifffile.imread(MOSAIC.parent / "fluo_mosaic_labels.tif"),
                                        mpp)]
    split = json.loads((ROOT / "cellseg" / "models" / "nuclei" / "split.json").read_text())
    ids = sorted(key.split("/")[1] for group, g in split["groups"].items()
                 if group.startswith("tnbc/") and g["side"] == "val" for key in g["images"])
    return "he-nuclei", [(i, np.asarray(Image.open(TNBC / "images" / f"{i}.jpg").convert("RGB")),
                          tifffile.imread(TNBC / "labels" / f"{i}.tif"), 0.25) for i in ids]


def ap50(result: Path, labels: Path):
    from cellseg.evaluation import load_image_masks, match, pair_iou
    pred, truth = (next(iter(load_image_masks(p).values())) for p in (result, labels))
    return match(pred, truth, 0.5, ious=pair_iou(pred, truth))


def run_set(name: str, mags: list[float], modes: list[str], device: str, tmp: Path, mpp_error: float = 1.0,
            truth: str = "nearest"
            ) -> list[dict]:
    import tifffile

    from cellseg.planning import DEFAULT_SCALE, load_protocol
    from cellseg.run import CellCounter
    protocol_name, items = fields(name)
    protocol = load_protocol(protocol_name)
    loaded = CellCounter.load(protocol, device)
    rows = []
    for mag in mags:
        copies = []
        for field, pixels, labels, mpp in items:
            path, truth_path = tmp / f"{field}_{mag}.ome.tif", tmp / f"{field}_{mag}_labels.tif"
            write_field(path, resample(pixels, mag), mpp / mag * mpp_error)
            tifffile.imwrite(truth_path, resample(labels, mag, labels=True, truth=truth), compression="zlib")
            copies.append((path, truth_path, labels))
        for mode in modes:
            counter = CellCounter(protocol, loaded.detector, tissue=loaded.tissue,
                                  model_diameter_px=loaded.model_diameter_px, micron_scale=loaded.micron_scale,
                                  diameter_px=DEFAULT_SCALE if mode == "default" else mode)
            cells = tp = fp = fn = 0
            at_1x = np.zeros(3, np.int64)     # tp, fp, fn of the nuclei mapped back onto the original's ground truth
            factors, methods, warnings, errors = [], set(), 0, []
            started = time.perf_counter()
            for path, truth_path, original in copies:
                out = tmp / f"{path.stem}_{mode}"
                summary = counter.count(path, out)
                m = ap50(out, truth_path)
                if mag != 1:
                    back = tmp / f"{path.stem}_{mode}_at_1x.tif"
                    tifffile.imwrite(back, to_shape(tifffile.imread(out / "labels.ome.tif"), original.shape),
                                     compression="zlib")
                    tifffile.imwrite(tmp / "original_labels.tif", original, compression="zlib")
                    o = ap50(back, tmp / "original_labels.tif")
                    at_1x += (o.tp, o.fp, o.fn)
                else:
                    at_1x += (m.tp, m.fp, m.fn)
                cells, tp, fp, fn = cells + summary["cell_count"], tp + m.tp, fp + m.fp, fn + m.fn
                errors.append(abs(summary["cell_count"] - m.true_count) / max(m.true_count, 1))
                factors.append(summary["scale"]["factor"])
                methods.add(summary["scale"].get("method") or "")
                warnings += bool(summary["scale"].get("warning"))
            rows.append({"set": name, "mode": mode, "mag": mag, "fields": len(copies), "cells": cells,
                         "ap50": tp / max(tp + fp + fn, 1), "ap50_at_1x": float(at_1x[0] / max(at_1x.sum(), 1)),
                         "median_count_error": float(np.median(errors)),
                         "true_cells": tp + fn, "factor_min": min(factors), "factor_max": max(factors),
                         "methods": sorted(methods), "scale_warnings": warnings,
                         "seconds": time.perf_counter() - started})
            print(_line(rows[-1], rows), flush=True)
    return rows


def _line(row: dict, rows: list[dict]) -> str:
    base = next((r for r in rows if r["set"] == row["set"] and r["mode"] == row["mode"] and r["mag"] == 1), None)
    vs = (f"{100 * (row['cells'] - base['cells']) / max(base['cells'], 1):+6.1f} % {row['ap50'] - base['ap50']:+.3f} "
          f"{row['ap50_at_1x']:.3f} {row['ap50_at_1x'] - base['ap50_at_1x']:+.3f}" if base else "")
    factors = (f"{row['factor_min']:.3g}" if row["factor_min"] == row["factor_max"]
               else f"{row['factor_min']:.3g}-{row['factor_max']:.3g}")
    return (f"{row['set']:>7} {row['mode']:>8} {row['mag']:>5g}x {row['cells']:>6} {row['ap50']:.3f} {vs}  "
            f"median count error {100 * row['median_count_error']:.1f} %  "
            f"scale {factors} ({', '.join(row['methods'])}; {row['scale_warnings']} warned) {row['seconds']:.0f} s")


def timing(repeats: int, tmp: Path) -> dict:
    """Wall and CPU seconds of `cellseg count` on the example mosaic with no --diameter and with --diameter native,
    interleaved (CPU seconds: the process's user + system time, less moved by other jobs on a shared machine)."""
    import resource
    seconds: dict[str, list[float]] = {"default": [], "native": []}
    cpu: dict[str, list[float]] = {"default": [], "native": []}
    scale_stage = []
    for k in range(repeats):
        for mode in ("default", "native"):
            out = tmp / f"timing_{mode}_{k}"
            command = ["cellseg", "count", str(MOSAIC), "-o", str(out), "-q"] + (
                ["--diameter", "native"] if mode == "native" else [])
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds[mode].append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[mode].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            summary = json.loads((out / "summary.json").read_text())
            if mode == "default":
                scale_stage.append(summary["seconds"].get("scale", 0.0))
            print(f"timing {mode:>8} run {k + 1}: {seconds[mode][-1]:.1f} s wall, {cpu[mode][-1]:.1f} s CPU, "
                  f"{summary['cell_count']} cells, scale {summary['scale']['factor']:.3g}", flush=True)
    median = {f"median_{m}_{what}": statistics.median(values[m]) for m in ("default", "native")
              for what, values in (("wall_s", seconds), ("cpu_s", cpu))}
    result = {"wall_s": seconds, "cpu_s": cpu, **median, "scale_stage_s": scale_stage,
              "cost_percent_wall": 100 * (median["median_default_wall_s"] - median["median_native_wall_s"])
              / median["median_default_wall_s"],
              "cost_percent_cpu": 100 * (median["median_default_cpu_s"] - median["median_native_cpu_s"])
              / median["median_default_cpu_s"]}
    print(f"example mosaic, median of {repeats}: default {median['median_default_wall_s']:.1f} s wall "
          f"({median['median_default_cpu_s']:.1f} s CPU), --diameter native {median['median_native_wall_s']:.1f} s "
          f"({median['median_native_cpu_s']:.1f} s CPU): the scale step costs {result['cost_percent_wall']:+.1f} % of "
          f"the wall time, {result['cost_percent_cpu']:+.1f} % of the CPU time (its 'scale' stage: "
          f"{statistics.median(scale_stage):.1f} s, whose tiles the count then takes as they are)")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="mosaic,tnbc")
    p.add_argument("--mags", default="1,0.5,0.75,2")
    p.add_argument("--modes", default="default,native")
    p.add_argument("--device", default="auto")
    p.add_argument("--timing", type=int, default=0, metavar="N")
    p.add_argument("--mpp-error", type=float, default=1.0, metavar="X",
                   help="Write each copy's pixel size X times off (2: a 40x field said to be 20x), to see the check.")
    p.add_argument("--truth", choices=("nearest", "coverage"), default="nearest",
                   help="how the ground truth is resampled with the pixels (resample, resample_labels)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from cellseg.detection import cpu_model
    mags = [float(m) for m in args.mags.split(",")]
    if 1.0 not in mags:
        mags.insert(0, 1.0)
    modes = args.modes.split(",")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    print(f"CPU {cpu_model()}, load average {' '.join(load)}; {sys.version.split()[0]}")
    print(f"{'set':>7} {'mode':>8} {'mag':>6} {'cells':>6} {'AP50':>5} {'vs 1x: cells':>8} {'AP50':>5} "
          f"{'AP50 at 1x':>5} {'vs 1x':>5}")
    results: dict = {"cpu": cpu_model(), "load_average": load}
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in filter(None, args.sets.split(",")):
            rows += run_set(name, mags, modes, args.device, Path(tmp), args.mpp_error, args.truth)
        results["rows"] = rows
        if args.timing:
            results["timing"] = timing(args.timing, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

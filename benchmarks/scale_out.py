"""Scale-out: the same slides counted on a local Dask cluster of 1 and of 2 worker processes, as
`cellseg count SLIDES --workers N` runs them (not part of the tests).

    python benchmarks/scale_out.py [--slides A.ome.tif B.ome.tif ...] [--workers 1 2] [--band-rows 2]
        [--device cpu] [--memory-sizes 10000 20000 [--memory-only]] [--json out.json]

For each N: a fresh cluster (distributed.connect, as the CLI starts it: one task thread per worker, the cores shared
out among the workers' networks), the shipped model loaded once in each worker, every slide counted into a
temporary folder (distributed.count_on_dask). Printed: wall time from submitting the job to the last result
committed, speedup over N = 1, analysed tiles per second, and each worker process's peak RSS and CPU seconds. The
cluster's start and the workers' first imports (torch, the writers' libraries; seconds a worker pays once) are
printed apart; loading the model is part of the job. The same slides counted in this process without Dask
(cohort.count_serially, `cellseg count` without --workers) are printed for reference, and the cells of every run
are checked to be the same. Default slides: the two fluorescence example slides (16 and 22 analysed tiles).

--memory-sizes: memory_flat.py's synthetic slides (the same tissue islands whatever the size) counted one at a time
by 2 workers: each worker's peak RSS against slide size.

The machine's load average is printed: on a shared machine it says how much of the CPU the run had.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIDES = [ROOT / "example_slides" / "fluo_mosaic.ome.tif", ROOT / "example_slides" / "empty_regions.ome.tif"]


def _worker_usage() -> dict:
    """This process's peak RSS and CPU seconds. The peak is the kernel's VmHWM: ru_maxrss would count the parent's
    memory too (Linux carries it over fork + exec, and Dask's workers are spawned by this process)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_mb = usage.ru_maxrss / 1024
    try:
        with open("/proc/self/status") as fh:
            peak_mb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        pass
    return {"peak_rss_mb": peak_mb, "cpu_s": usage.ru_utime + usage.ru_stime}


def _import_libraries() -> None:
    """What a fresh worker process imports on its first tasks (torch and the network, the writers' libraries): a
    cost of starting the worker, paid once whatever the cohort, and not timed (as run.py leaves out imports)."""
    import importlib
    for name in ("cellseg.detection.detector", "cellseg.tissue.unet", "skimage.measure", "matplotlib.figure", "pandas"):
        importlib.import_module(name)


def on_dask(spec, slides: list[Path], workers: int, band_rows: int | None, folder: Path) -> dict:
    from cellseg.run import connect, count_on_dask
    started = time.perf_counter()
    with connect(workers, None) as client:
        client.run(_import_libraries)
        up = time.perf_counter() - started
        jobs = [(s, folder / f"n{workers}" / s.name) for s in slides]
        t = time.perf_counter()
        outcomes = count_on_dask(spec, jobs, scheduler=client.scheduler.address, band_rows=band_rows)
        wall = time.perf_counter() - t
        usage = sorted(client.run(_worker_usage).values(), key=lambda u: -u["peak_rss_mb"])
    failed = [str(o.error) for o in outcomes if o.error is not None]
    if failed:
        sys.exit(f"a slide failed: {failed[0]}")
    return {"workers": workers, "cluster_start_s": up, "wall_s": wall, "outcomes": outcomes, "usage": usage}


def in_process(spec, slides: list[Path], band_rows: int | None, folder: Path) -> dict:
    from cellseg.run import count_serially
    counter = spec.load()
    t, cpu = time.perf_counter(), time.process_time()
    outcomes = list(count_serially(counter, [(s, folder / "serial" / s.name) for s in slides], band_rows=band_rows))
    usage = {**_worker_usage(), "cpu_s": time.process_time() - cpu}
    return {"wall_s": time.perf_counter() - t, "outcomes": outcomes, "usage": [usage]}


def analysed_tiles(outcomes) -> int:
    return sum(o.summary["tiles_total"] - o.summary["tiles_skipped"] for o in outcomes)


def cells_of(outcomes) -> list[bytes]:
    return [(o.out / "cells.csv").read_bytes() for o in outcomes]


def speed_table(spec, args, folder: Path, report: dict) -> None:
    """The slides in one process, then on each number of workers: wall time, speedup, tiles/s, per worker."""
    serial = in_process(spec, args.slides, args.band_rows, folder)
    tiles = analysed_tiles(serial["outcomes"])
    print(f"{'run':>16} {'wall s':>8} {'speedup':>8} {'tiles/s':>8} {'start + imports s':>18}   per worker: "
          f"peak RSS MB, CPU s")
    print(f"{'one process':>16} {serial['wall_s']:>8.1f} {'':>8} {tiles / serial['wall_s']:>8.2f} {'':>18}   "
          f"{serial['usage'][0]['peak_rss_mb']:.0f} MB {serial['usage'][0]['cpu_s']:.0f} s   "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    report["one_process"] = {"wall_s": serial["wall_s"], "tiles": tiles, **serial["usage"][0]}
    base = None
    for n in args.workers:
        run = on_dask(spec, args.slides, n, args.band_rows, folder)
        if cells_of(run["outcomes"]) != cells_of(serial["outcomes"]):
            sys.exit(f"the cells of {n} workers differ from the single process's")
        if n == 1:
            base = run["wall_s"]
        speedup = f"{base / run['wall_s']:.2f}x" if base else ""
        per_worker = ", ".join(f"{u['peak_rss_mb']:.0f} MB {u['cpu_s']:.0f} s" for u in run["usage"])
        print(f"{f'{n} worker(s)':>16} {run['wall_s']:>8.1f} {speedup:>8} {tiles / run['wall_s']:>8.2f} "
              f"{run['cluster_start_s']:>18.1f}   {per_worker}   (load average {os.getloadavg()[0]:.1f})", flush=True)
        report[f"workers_{n}"] = {"wall_s": run["wall_s"], "tiles_per_s": tiles / run["wall_s"],
                                  "cluster_start_s": run["cluster_start_s"], "workers": run["usage"]}
    print(f"the same cells in every run ({sum(o.summary['cell_count'] for o in serial['outcomes'])})")


def memory_table(spec, args, folder: Path, report: dict) -> None:
    """memory_flat.py's synthetic slides, one at a time on 2 workers: each worker's peak RSS against slide size."""
    sys.path.insert(0, str(Path(__file__).parent))
    from memory_flat import write_synthetic_slide
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{'slide':>12} {'tiles':>7} {'analysed':>9}   per worker (2): peak RSS MB")
    for size in args.memory_sizes:
        slide = args.workdir / f"islands_{size}.tif"
        if not slide.exists():
            write_synthetic_slide(slide, size)
        run = on_dask(spec, [slide], 2, None, folder / f"mem{size}")
        s = run["outcomes"][0].summary
        rss = ", ".join(f"{u['peak_rss_mb']:.0f}" for u in run["usage"])
        print(f"{size:>6}x{size:<5} {s['tiles_total']:>7} {s['tiles_total'] - s['tiles_skipped']:>9}   {rss}",
              flush=True)
        report[f"memory_{size}"] = {"tiles": s["tiles_total"], "workers": run["usage"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=Path, nargs="+", default=SLIDES)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--band-rows", type=int, default=2, help="tile rows per band (the CLI's default: 64 tiles)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--protocol", default="fluorescence-nuclei")
    p.add_argument("--memory-sizes", type=int, nargs="*", default=[])
    p.add_argument("--memory-only", action="store_true", help="only the --memory-sizes table")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cellseg-scale-out")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from cellseg.planning import load_protocol
    from cellseg.run import CounterSpec
    spec = CounterSpec(load_protocol(args.protocol), args.device)
    report = {"cpus": os.cpu_count(), "band_rows": args.band_rows, "slides": [str(s) for s in args.slides]}
    print(f"{len(args.slides)} slides, band rows {args.band_rows}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.memory_only:
            speed_table(spec, args, Path(tmp), report)
        if args.memory_sizes:
            memory_table(spec, args, Path(tmp), report)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""How fast can `cellseg count` go when the network costs nothing? (not a test)

Runs a slide through `counter.CellCounter` twice with memory_flat's threshold detector (connected components of bright
pixels, the same TileDetections contract) in the network's place: the first run records every tile's detections,
the second, timed, gets them back at no cost (detection runs in a thread of its own, alongside merging and
writing, so a stand-in's time could not simply be subtracted). What the timed run spends (reading, tissue,
merging, measuring, every result file written) is the part of an end-to-end run that no GPU makes faster: its
megapixels of tissue per second are the ceiling of the GPU path on this machine, and its stage split says which
stage to work on. By default (`--path gpu`) it is the GPU path's host work: the tissue U-Net, which runs on the GPU
there, is recorded and replayed like the detections (the thumbnail is still read and scaled for it, the mask
still made), and tiles reach the stand-in as a GPU detector's readers hand them over (the model channel copied, to
be page-locked; normalised on the device). `--path cpu` times what a CPU count does besides the cell network: the
U-Net run, tiles normalised by the readers. Run on a dense slide built by make_big_slide.py:

    python benchmarks/make_big_slide.py --size 8192 --out /tmp/big8k.ome.tif
    python benchmarks/pipeline_ceiling.py --slide /tmp/big8k.ome.tif [--path gpu|cpu] [--json out.json]

Each run is a fresh subprocess (imports, the tissue U-Net's loading and the start of the result files' processes,
which `CellCounter.load` overlaps with the network's loading, are not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(slide: Path, out: Path, tissue: str, cpus: int | None, outputs: str = "all",
          writer_processes: str = "auto", path: str = "gpu", measure_processes: str = "auto") -> dict:
    if cpus:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cpus]))
    from memory_flat import ThresholdDetector, keep_result_writers

    import cellseg.results as results
    results.ResultWriter.process_per_output = {"auto": None, "one": False, "per-output": True}[writer_processes]
    from cellseg.run import measuring
    measuring.measure_processes = None if measure_processes == "auto" else int(measure_processes)
    from cellseg.planning import load_protocol
    from cellseg.run import CellCounter
    from cellseg.util import usable_cores

    writers = keep_result_writers()
    report_s = []
    write_report = results.write_report

    def timed_report(*args, **kwargs):      # after summary.json: not in its stages, in the wall time
        start = time.perf_counter()
        try:
            return write_report(*args, **kwargs)
        finally:
            report_s.append(time.perf_counter() - start)
    results.write_report = timed_report

    replaying = [False]
    if path == "gpu":
        # On a GPU the tissue U-Net runs there (TileDetector.device): its probabilities too are recorded on the first
        # run and handed back on the timed one; the view it is given is still read and scaled, its mask still made.
        import cellseg.tissue.unet as unet
        run_unet, unet_output = unet.predict_tissue, {}

        def predict_tissue(net, view, **kwargs):
            key = (view.shape, str(view.dtype))
            if not replaying[0]:
                unet_output[key] = run_unet(net, view, **kwargs)
            else:       # the host's part of it on a GPU: the view scaled for the network
                unet._apply(view, *unet._scaling(view))
            return unet_output[key].copy()
        unet.predict_tissue = predict_tissue

    class Replay(ThresholdDetector):
        """The stand-in's detections, recorded on a first run and handed back instantly on the timed one."""

        def __init__(self):
            self.recorded, self.replaying = {}, False

        def prepare(self, raw, box, network):
            if self.replaying and path == "gpu":
                # what a GPU detector's readers do (Detector.prepare, PinnedTile): the model channel copied into
                # page-locked memory; normalising it is the GPU's work
                from cellseg.planning import select_channels
                return np.array(select_channels(raw, network.channel))
            return network.of(raw, box)

        def detect(self, images, tiles, scale=1.0):
            if self.replaying:
                return [self.recorded[t.read] for t in tiles]
            found = super().detect(images, tiles, scale)
            self.recorded.update((t.read, d) for t, d in zip(tiles, found))
            return found

    detector = Replay()
    counter = CellCounter(load_protocol("fluorescence-nuclei").replace(tissue_method=tissue, outputs=outputs), detector)
    counter.count(slide, out.with_name(out.name + "-record"))
    detector.replaying = replaying[0] = True
    report_s.clear()
    def children_cpu() -> float:      # the tables' process (results/writer_process.py), once it has ended
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    # as CellCounter.load does while the network loads: the result files' processes started (not timed, like imports)
    results.ResultWriter.start_spare_processes()
    measuring.start_spare_measurers()      # as CellCounter.load does: the measuring processes, where there are cores
    from cellseg.results import writer_process
    writer_process.wait_for_spares()
    measuring.wait_for_spare_measurers()
    measurers = measuring_pids()
    start, cpu_start, main_start = time.perf_counter(), time.process_time(), time.thread_time()
    children_start = (children_cpu() + sum(process_cpu(s.process.pid) for s in writer_process._spares)
                      + sum(process_cpu(pid) for pid in measurers))
    summary = counter.count(slide, out)
    pipeline_s = time.perf_counter() - start
    main_thread_cpu_s = time.thread_time() - main_start
    cpu_s = (time.process_time() - cpu_start + children_cpu() + sum(process_cpu(pid) for pid in measuring_pids())
             - children_start)
    tissue_mp = summary["tissue_area_px"] / 1e6
    parts = {name: round(s, 2) for name, s in writers[-1].seconds().items()}
    parts["report.html"] = round(sum(report_s), 2)
    return {"slide": slide.name, "slide_mp": summary["height_px"] * summary["width_px"] / 1e6,
            "tissue_mp": round(tissue_mp, 2), "tiles_analysed": summary["tiles_total"] - summary["tiles_skipped"],
            "cells": summary["cell_count"], "wall_s": round(pipeline_s, 2), "pipeline_s": round(pipeline_s, 2),
            "cpu_s": round(cpu_s, 2), "main_thread_cpu_s": round(main_thread_cpu_s, 2),
            "ceiling_mp_per_s": round(tissue_mp / pipeline_s, 2), "cells_per_s": round(summary["cell_count"] / pipeline_s),
            "stages_s": summary["seconds"], "write_parts_s": parts,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "writer_process_rss_mb": round(writers[-1].writer_process_rss_mb() or 0),
            "cpu_cores": usable_cores(), "cpu_model": cpu_model(), "path": path,
            "measure_processes": measuring.measure_processes_for(usable_cores())}


def measuring_pids() -> list[int]:
    """The idle measuring processes' ids (run/measuring.py): a count takes them and gives them back."""
    from cellseg.run import measuring
    return [child.process.pid for child in measuring._idle]


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """/proc/cpuinfo's model name, family and model (the figures depend on the processor)."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return "unknown"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--tissue", choices=["unet", "otsu", "none"], default="unet")
    p.add_argument("--cpus", type=int, default=None,
                   help="run on this many of the machine's cores (taskset; default: all it may use)")
    p.add_argument("--out", type=Path, default=None,
                   help="keep the timed run's result folder here (to compare with another run: same_results.py)")
    p.add_argument("--outputs", default="all", help="the result files to write (cellseg count --outputs)")
    p.add_argument("--writer-processes", choices=["auto", "one", "per-output"], default="auto",
                   help="the result files in one child process, one per heavy output, or as the cores say (auto)")
    p.add_argument("--path", choices=["gpu", "cpu"], default="gpu",
                   help="whose host work to time: the GPU path's (default: the tissue U-Net's output replayed too, "
                        "tiles handed over as native pixels, normalised on the device) or the CPU path's (the U-Net "
                        "run, tiles normalised by the readers), each without the cell network")
    p.add_argument("--measure-processes", default="auto",
                   help="measure the tiles' nuclei in this many processes of their own (0: in the count's thread; "
                        "auto: as the cores say, run/measuring.py)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        slide, out, tissue, cpus, outputs, writer_processes, path, measure_processes = args.child
        print(json.dumps(child(Path(slide), Path(out), tissue, int(cpus) or None, outputs, writer_processes, path,
                               measure_processes)))
        return
    if not args.slide.is_file():
        sys.exit(f"expected a slide file, found no {args.slide}")
    with tempfile.TemporaryDirectory(prefix="cellseg-ceiling-") as tmp:
        out = args.out.resolve() if args.out is not None else Path(tmp) / "out"
        res = subprocess.run([sys.executable, __file__, "--slide", str(args.slide), "--child", str(args.slide),
                              str(out), args.tissue, str(args.cpus or 0), args.outputs, args.writer_processes,
                              args.path, args.measure_processes],
                             capture_output=True, text=True)
        shutil.rmtree(out.with_name(out.name + "-record"), ignore_errors=True)
    if res.returncode:
        sys.exit(f"the pipeline run failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{r['slide']}: {r['slide_mp']:.0f} MP, {r['tissue_mp']:.0f} MP of tissue, {r['tiles_analysed']} tiles analysed, "
          f"{r['cells']} cells (threshold stand-in), {r['cpu_cores']} CPU cores of {r['cpu_model']}, "
          f"{r['measure_processes']} measuring processes")
    print(f"pipeline without the network ({r['path']} path): {r['pipeline_s']} s ({r['cpu_s']} s of CPU, "
          f"{r['main_thread_cpu_s']} s of it the count's main thread) -> "
          f"{r['ceiling_mp_per_s']} MP of tissue/s, {r['cells_per_s']} cells/s (detections replayed at no cost"
          + ("; the tissue U-Net's output too" if r["path"] == "gpu" else "") + ")")
    print("stages (s):", ", ".join(f"{k} {v}" for k, v in r["stages_s"].items()),
          "(detect: handing back the replayed detections; write: the count's own thread, adding tiles to the "
          "writers and waiting for them at the end)")
    print("writer threads, busy (s):", ", ".join(f"{k} {v}" for k, v in r["write_parts_s"].items()),
          "(labels: the label canvases, then the label pyramids and the overlay; report.html after summary.json, drawn "
          "while the label images are written, its wait for them before its crops included)")
    print(f"peak RSS {r['peak_rss_mb']} MB (the count), {r['writer_process_rss_mb']} MB (the result files' processes, summed)")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

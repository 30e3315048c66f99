"""Where the detection thread's time goes, tile by tile, on a GPU or a CPU (not a test): issue 50's question.

On an H100 a 20480² count keeps the GPU busy only 11-16 % of the time while the detection stage takes ~34 s for
1,600 tiles: the host, not the GPU, sets the pace. This runs the shipped bundle's Detector, configured as a count
configures it (thresholds, the device's batch size and precision), on TILES dense tiles of 512 px + 64 px halo and
prints, per tile:

- the wall time of `detect_images` (synchronised at the end), after one warm-up batch;
- the network's parts (cellseg.input / transform / backbone / rpn / roi_heads / paste: record_function ranges in
  detection/detector.py and rcnn_parts.py) as host time: on a GPU the host only queues kernels, so a part's host
  time above its kernels' is Python, launches and waits;
- on a GPU: the kernels' own time (the GPU's busy share of the wall time), the kernel launches, and the host time
  blocked in synchronisations (a `.cpu()`, `.item()`, `nonzero` or `torch.where` on a device tensor waits for every
  kernel queued before it, so the GPU idles while the host then runs the next Python);
- operator calls a tile, those whose output size depends on the data (each a wait on a GPU), and where in the pass
  those waits (and on a GPU the synchronisations and copies) are; on a CPU RoIAlign runs as matrix products
  (detection/roi_align.py, CPU-only), whose selections count under roi_heads too;
- the 15 operators with the most host time of their own.

    python benchmarks/detect_profile.py --device cuda [--tiles 96] [--slide SLIDE]   # a lent GPU (gpu_benchmark.sh)
    python benchmarks/detect_profile.py --device cpu --tiles 8                       # the dry run here

Without --slide the tiles come from a dense slide made by make_big_slide.py in a
temporary folder (6144² for 96 tiles). Pause the long training first on a CPU (`bash scripts/train_long.sh pause`).
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
# Operators whose output size depends on the data: on a GPU each makes the host wait for every kernel queued before it
# (as does every copy to the host, which a CPU profile cannot see): counted on either device
DATA_DEPENDENT = ("aten::nonzero", "aten::_local_scalar_dense", "torchvision::nms", "aten::unique_consecutive",
                  "aten::_unique2", "aten::masked_select")
PARTS = ("cellseg.input", "cellseg.transform", "cellseg.backbone", "cellseg.rpn", "cellseg.roi_heads", "cellseg.paste")


def dense_slide(folder: Path, tiles: int) -> Path:
    """A make_big_slide.py slide with at least `tiles` tiles of 512 px inside its border."""
    import subprocess
    side = 2048 * math.ceil(512 * (math.ceil(math.sqrt(tiles)) + 1) / 2048)    # make_big_slide's sizes
    path = folder / f"dense_{side}.ome.tif"
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_big_slide.py")), "--size", str(side),
                    "--out", str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


def device_seconds(event) -> float:
    """An averaged event's own time on the device (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name) / 1e6
    return 0.0


def waits_by_part(events, names: tuple[str, ...]) -> dict[str, int]:
    """How many of the profiled `events` named in `names` ran inside each part of the pass (the PARTS ranges, on the
    same thread), "other" for those outside every part: where the waits for the device are."""
    parts = [(e.time_range.start, e.time_range.end, e.thread, e.name) for e in events if e.name in PARTS]
    counts = {part: 0 for part in (*PARTS, "other")}
    for e in events:
        if e.name not in names:
            continue
        start = e.time_range.start
        inside = [name for (s, end, thread, name) in parts if s <= start < end and thread == e.thread]
        counts[inside[0] if inside else "other"] += 1
    return {part: count for part, count in counts.items() if count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=None, help="default: a dense slide made for the run")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiles", type=int, default=96)
    p.add_argument("--batch", type=int, default=None, help="tiles a pass (default: a count's on the device)")
    args = p.parse_args()

    import torch
    from network_ops import tiles as dense_tiles
    from torch.profiler import ProfilerActivity, profile

    from cellseg.bundles import load_bundle
    from cellseg.detection import Detector, cpu_model

    bundle = load_bundle(args.model)
    with tempfile.TemporaryDirectory() as work:
        slide = args.slide or dense_slide(Path(work), args.tiles)
        images = dense_tiles(str(slide), args.tiles)
    detector = Detector.from_bundle(bundle, args.device, score_threshold=bundle.threshold_for("fluorescence"),
                                    mask_threshold=bundle.mask_threshold_for("fluorescence"), batch_size=args.batch,
                                    precision="auto")
    cuda = detector.device.type == "cuda"
    detector.streams = None    # on a CPU: passes on torch's own pool, in this thread, where the profiler sees them
    where = torch.cuda.get_device_name() if cuda else f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; model {bundle.name} ({bundle.weights_sha256[:12]}), "
          f"{detector.precision_note}; {len(images)} dense tiles of {images[0].shape[1]} px, "
          f"{detector.batch_size} a pass")

    def run() -> tuple[float, int]:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        cells = sum(len(d) for d in detector.detect_images(images))
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, cells

    detector.detect_images(images[:detector.batch_size])        # warm-up: kernels and allocations for this shape
    seconds, cells = run()
    per_tile_ms = 1000 * seconds / len(images)
    print(f"detect_images: {seconds:.2f} s, {per_tile_ms:.1f} ms a tile, {cells / len(images):.0f} cells a tile")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        profiled, _ = run()
    averages = prof.key_averages()
    by_key = {e.key: e for e in averages}
    n = len(images)
    print(f"under the profiler: {profiled:.2f} s ({1000 * profiled / n:.1f} ms a tile)")
    print("host time a tile, by part of the pass (ms; the parts run one after another in one thread):")
    for part in PARTS:
        if part in by_key:
            print(f"  {part.removeprefix('cellseg.'):10s} {by_key[part].cpu_time_total / 1e3 / n:8.2f}")
    operators = [e for e in averages if "::" in e.key]
    waits = collections.Counter({e.key: e.count / n for e in operators if e.key in DATA_DEPENDENT})
    print(f"operator calls a tile: {sum(e.count for e in operators) / n:.0f}; of them with a data-dependent output "
          f"size (a GPU's waits, copies to the host not counted): {sum(waits.values()):.1f} "
          f"({', '.join(f'{k} {v:.1f}' for k, v in waits.most_common())})")
    by_part = waits_by_part(prof.events(), DATA_DEPENDENT + (SYNCS if cuda else ()))
    print("of those" + (" and the synchronisations and copies" if cuda else "") + ", a tile by part of the pass: "
          + ", ".join(f"{part.removeprefix('cellseg.')} {count / n:.1f}" for part, count in by_part.items()))
    if cuda:
        kernels = sum(device_seconds(e) for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
        launches = sum(e.count for e in averages if e.key in LAUNCHES)
        syncs = collections.Counter({e.key: e.self_cpu_time_total / 1e6 for e in averages if e.key in SYNCS})
        sync_calls = sum(e.count for e in averages if e.key in SYNCS)
        print(f"GPU kernels: {1000 * kernels / n:.2f} ms a tile, busy {100 * kernels / profiled:.0f} % of the wall "
              f"time; {launches / n:.0f} kernel launches a tile")
        print(f"host blocked in synchronisations and copies: {1000 * sum(syncs.values()) / n:.2f} ms a tile in "
              f"{sync_calls / n:.0f} calls a tile ({', '.join(f'{k} {1000 * v / n:.2f}' for k, v in syncs.most_common())})")
    print("operators with the most host time of their own (ms a tile, calls a tile):")
    ops = sorted((e for e in averages if not e.key.startswith("cellseg.")), key=lambda e: -e.self_cpu_time_total)
    for e in ops[:15]:
        print(f"  {e.key[:48]:48s} {e.self_cpu_time_total / 1e3 / n:8.2f} {e.count / n:8.1f}")


if __name__ == "__main__":
    main()

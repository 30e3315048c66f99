"""Where the network's CPU time goes, by operator (not a test): what a faster CPU path has to attack.

Runs the shipped bundle's Detector on TILES tiles of 512 px + 64 px halo cut from the example mosaic (each tile
scaled by its own 1st / 99.8th percentiles: close to a count's normalisation, and the operator shares hardly depend
on it), all in one forward pass on torch's thread pool (no side-by-side streams, so torch.profiler sees every
operator), once per precision
after a warm-up pass, and prints each operator group's share of the CPU time:
convolutions, matrix products (the box head's fully connected layers), RoIAlign (every operator the poolers run,
detection/roi_align.py), NMS, GroupNorm, copies and concatenations, the rest.

    python benchmarks/network_ops.py [--precisions fp32,bf16] [--tiles 4]

Pause the long training first (`bash scripts/train_long.sh pause`): shares are what matter, but a busy machine
moves them too.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

GROUPS = (("convolution", ("convolution",)), ("matrix products", ("addmm", "aten::mm", "bmm", "linear")),
          ("RoIAlign", ("roi_align",)), ("NMS", ("nms",)), ("GroupNorm", ("group_norm",)),
          ("copies, concatenations", ("copy_", "aten::cat", "to_dense", "contiguous")))


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def group_of_event(event) -> str:
    """An operator's group; anything run inside a RoI pooler's range (its gathers and products) is RoIAlign."""
    node = event
    while node is not None:
        if "roi_align" in node.name:
            return "RoIAlign"
        node = node.cpu_parent
    return group_of(event.name)


def tiles(slide_path: str, n: int) -> list[np.ndarray]:
    from cellseg.geometry import Box
    from cellseg.slides import open_slide
    slide = open_slide(slide_path)
    height, width = slide.info.levels[0]
    corners = [(r, c) for r in range(64, height - 576, 512) for c in range(64, width - 576, 512)][:n]
    out = []
    for r, c in corners:
        a = slide.read_region(Box(r - 64, c - 64, r + 576, c + 576))[..., 0].astype(np.float32)
        lo, hi = np.percentile(a, [1, 99.8])
        out.append(np.repeat(np.clip((a - lo) / (hi - lo + 1e-6), 0, 1)[None], 3, 0).astype(np.float32))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", default="example_slides/fluo_mosaic.ome.tif")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--tiles", type=int, default=4)
    p.add_argument("--precisions", default="fp32,bf16")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from cellseg.bundles import load_bundle
    from cellseg.detection import Detector, cpu_has_native_bf16, cpu_model
    bundle = load_bundle(args.model)
    images = tiles(args.slide, args.tiles)
    print(f"CPU {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; model {bundle.name} "
          f"({bundle.weights_sha256[:12]}); {len(images)} tiles of {images[0].shape[1]} px in one pass")
    for precision in args.precisions.split(","):
        if precision == "bf16" and not cpu_has_native_bf16():
            print("bf16: skipped, this CPU has no native bf16")
            continue
        detector = Detector.from_bundle(bundle, "cpu", score_threshold=bundle.threshold_for("fluorescence"),
                                        mask_threshold=bundle.mask_threshold, precision=precision,
                                        batch_size=len(images))
        detector.streams = None          # one pass on torch's pool: the profiler sees every operator
        detector.detect_images(images)   # warm-up: kernels for this shape
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            cells = sum(len(d) for d in detector.detect_images(images))
        by_group: dict[str, float] = collections.Counter()
        for event in prof.events():
            by_group[group_of_event(event)] += event.self_cpu_time_total / 1e6
        total = sum(by_group.values())
        print(f"\n{precision} ({detector.precision_note}): {cells} cells, {total:.2f} s of operator CPU time")
        for group, seconds in sorted(by_group.items(), key=lambda kv: -kv[1]):
            print(f"  {group:24s} {seconds:7.3f} s  {100 * seconds / total:5.1f} %")


if __name__ == "__main__":
    main()

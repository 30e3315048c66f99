"""End-to-end throughput of `cellseg count` against the naive torchvision use of the same network (not a test).

Two runs on the SAME pixels (same tile grid, core + halo reads, same normalisation through
cellseg.planning.intensity with the intensity range cellseg measured) and the SAME weights (the shipped bundle):

- cellseg: `counter.CellCounter` with the protocol's detector, exactly as `cellseg count` runs it
  (every result file written). Stage seconds come from count_slide's summary ("seconds").
- naive:   the network rebuilt from the bundle's ModelConfig and state dict, then given torchvision's
  defaults (docs/architecture.md, "Detection"): GeneralizedRCNNTransform(min_size=800, max_size=1333) (every tile rescaled),
  masks pasted on full-tile canvases by torchvision's postprocess (paste_masks_in_image),
  roi_heads.detections_per_img = 100, RPN pre/post-NMS top-n 2000/2000 train, 1000/1000 test.
  Kept: the bundle's anchors, image mean/std, box NMS threshold and score threshold (they are the model,
  not torchvision's defaults). One tile at a time; cells kept the simple way: score >= the bundle's
  threshold, mask probability > mask_threshold, centroid in the tile core; no seam dedupe; a label image
  painted in ascending score (higher score wins a shared pixel). It measures nothing and writes no files.

Each run is a fresh subprocess (peak RSS is its own: ru_maxrss, which includes torch and the model);
model loading and a small warm-up forward are not timed.

Tissue: cellseg finds tissue first (--tissue, default the protocol's: the U-Net) and skips tiles with too
little of it; the naive run has no such filter and analyses every tile, as a plain torchvision loop would.
Both MP/s figures divide the same number: megapixels of tissue (cellseg's tissue mask area; the whole
image with --tissue none). `ratio` = cellseg MP/s / naive MP/s; `ratio_per_tile` compares seconds per analysed
tile, which leaves the tissue filter's skipping out.

Where a ground-truth label image lies next to the slide (NAME_labels.tif for NAME.ome.tif / NAME.tif),
both label images are matched to it one-to-one at IoU >= 0.5 (cellseg.evaluation.scoring.match): "correct" = TP.

--tiles N limits both runs to a region of at most N whole tiles at the top left of the slide (r x c tiles,
as many as possible, as square as possible): the slide and its labels are cropped to it first, so both
runs see exactly the same pixels (halos stop at the crop edge).

--rounds N (default 3) runs every variant and the naive run N times, interleaved, each a fresh subprocess: the
seconds reported are each run's median and the ratio is the ratio of medians; every round's own ratio is printed
too, so the spread is seen (a shared 2-core machine varies up to 2x from minute to minute).

--tta runs cellseg with test-time augmentation (cellseg count --tta), to state its cost against the same naive run.

--isa avx2 caps every run's kernels at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2): a CPU with AVX-512
and bf16 then runs the code paths of one without either, such as a Zen 3 (not its clock, caches or FMA width), and
cellseg runs fp32 only. --isa avx512 (ONEDNN_MAX_CPU_ISA=AVX512_CORE ATEN_CPU_CAPABILITY=avx512) keeps AVX-512 but
not VNNI, bf16 or AMX: the code paths of a Skylake-class Xeon. Caps set in the environment are honoured the same
way; the CPU line names them.

    nice -n 5 python benchmarks/run.py --slide example_slides/fluo_mosaic.ome.tif --device cpu \
        --json /tmp/bench.json [--tiles 4] [--tta]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers

# --isa: the environment that caps torch's kernels (oneDNN's and ATen's) at an older CPU's instruction sets
ISA_CAPS = {"native": {},
            "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
            "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"}}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _gpu_reset(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mb(device) -> float | None:
    import torch
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def _labels_next_to(slide: Path) -> Path | None:
    name = slide.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    path = slide.parent / f"{name}_labels.tif"
    return path if path.is_file() else None


def choose_region(n_rows: int, n_cols: int, limit: int | None) -> tuple[int, int]:
    """(rows, cols) of whole tiles at the top left: the most tiles <= limit, then the squarest."""
    if limit is None or limit >= n_rows * n_cols:
        return n_rows, n_cols
    if limit < 1:
        raise SystemExit(f"expected --tiles >= 1, got {limit}")
    best = max(((r, c) for r in range(1, n_rows + 1) for c in range(1, n_cols + 1) if r * c <= limit),
               key=lambda rc: (rc[0] * rc[1], -abs(rc[0] - rc[1])))
    return best


def crop_slide(src: Path, dst: Path, height: int, width: int) -> None:
    """The top-left height x width px of `src` as a one-level OME-TIFF, pixel size and channel names kept."""
    import tifffile

    from cellseg.geometry import Box
    from cellseg.slides import open_slide
    with open_slide(src) as slide:
        info = slide.info
        pixels = slide.read_region(Box(0, 0, height, width))
    c = info.n_channels
    if c == 1:
        data, axes, photometric = pixels[..., 0], "YX", "minisblack"
    elif c == 3:
        data, axes, photometric = pixels, "YXS", "rgb"
    else:
        data, axes, photometric = np.ascontiguousarray(pixels.transpose(2, 0, 1)), "CYX", "minisblack"
    meta = {"axes": axes}
    if info.mpp:
        meta.update(PhysicalSizeX=info.mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=info.mpp, PhysicalSizeYUnit="µm")
    if info.channel_names and len(info.channel_names) == c and c != 3:
        meta["Channel"] = {"Name": list(info.channel_names)}
    with tifffile.TiffWriter(dst, ome=True) as tw:
        tw.write(data, metadata=meta, tile=(256, 256), compression="zlib", compressionargs={"level": 1},
                 photometric=photometric)


def crop_labels(src: Path, dst: Path, height: int, width: int) -> None:
    import tifffile

    from cellseg.geometry import Box
    from cellseg.slides import open_slide
    with open_slide(src) as slide:
        labels = slide.read_region(Box(0, 0, height, width))[..., 0]
    tifffile.imwrite(dst, labels, tile=(256, 256), compression="zlib", compressionargs={"level": 1}, metadata=None)


def instrument(model, timer, device) -> dict:
    """Time the network's parts with forward hooks (seconds into `timer` as "net.<part>") and count the
    RoIs that reach the mask head. Returns the counter dict. Where forward passes run side by side on a CPU
    (detection.streams) the seconds are summed over them: thread-seconds, not wall time."""
    import threading

    import torch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    counts = {"mask_head_rois": 0, "forward_calls": 0}
    rh = model.roi_heads
    # (start module, end module): the mask branch is RoIAlign (mask_roi_pool) -> mask_head -> mask_predictor; the
    # backbone starts where the transform ends, as its body may be a slide's copy (detect.Detector.calibrated)
    parts = {"backbone": (model.transform, model.backbone.fpn), "rpn": (model.rpn, model.rpn),
             "roi_heads": (rh, rh), "mask_branch": (rh.mask_roi_pool, rh.mask_predictor)}
    starts, adding = threading.local(), threading.Lock()    # each stream's pass has its own start times
    for name, (first, last) in parts.items():
        def pre(mod, inp, name=name):
            sync()
            setattr(starts, name, time.perf_counter())

        def post(mod, inp, out, name=name):
            sync()
            with adding:
                timer.seconds[f"net.{name}"] += time.perf_counter() - getattr(starts, name)
                if name == "mask_branch":
                    counts["mask_head_rois"] += int(inp[0].shape[0])
                elif name == "backbone":
                    counts["forward_calls"] += 1
        if name == "backbone":
            first.register_forward_hook(lambda mod, inp, out, pre=pre: pre(mod, inp))
        else:
            first.register_forward_pre_hook(pre)
        last.register_forward_hook(post)
    return counts


# --------------------------------------------------------------------------- child: cellseg

def child_cellseg(spec: dict) -> dict:
    import torch

    from cellseg.planning import load_protocol
    from cellseg.run import CellCounter
    from cellseg.util import StageTimer

    precision, _, option = spec.get("precision", "").partition(":")
    protocol = load_protocol(spec["protocol"]).replace(tile_size=spec["tile_size"], model=spec["model"],
                                                       tissue_method=spec["tissue"], precision=precision or None)
    t = time.perf_counter()
    counter = CellCounter.load(protocol, spec["device"], tta=spec.get("tta", False))   # network + tissue U-Net
    from cellseg.detection import AugmentedDetector
    detector = counter.detector.inner if isinstance(counter.detector, AugmentedDetector) else counter.detector
    if option == "1stream":      # the variant before detection.streams: one forward pass at a time
        detector.streams = None
    elif option.startswith("switch"):   # the interpreter's switch interval in a count, in ms (util.threads.quick_handoff)
        import cellseg.util.threads as threads
        threads.HANDOFF_SECONDS = float(option.removeprefix("switch")) / 1000
    elif option:
        raise SystemExit(f"expected a variant option 1stream or switchMS (e.g. switch5), found {option!r}")
    load_s = time.perf_counter() - t
    # when the count's last analysed tile came out, and each result file's busy seconds: what follows the tiles
    # (the tail: the result files finishing, the label images, the report) against the count's whole time
    from memory_flat import keep_result_writers

    import cellseg.run.pipeline as pipeline
    writers, last_tile = keep_result_writers(), []
    reported = pipeline.reported

    def timed_reported(*args, **kwargs):
        yield from reported(*args, **kwargs)
        last_tile.append(time.perf_counter())
    pipeline.reported = timed_reported
    detector.detect([np.zeros((3, 128, 128), np.float32)])  # warm-up (allocators, kernels): not timed
    net_timer = StageTimer()
    counts = instrument(detector.model, net_timer, detector.device)
    _gpu_reset(detector.device)
    out = Path(spec["out"])
    t, cpu = time.perf_counter(), time.process_time()
    summary = counter.count(Path(spec["slide"]), out)
    if detector.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    wall, cpu = end - t, time.process_time() - cpu
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    tail = {"after_last_tile_s": round(end - last_tile[-1], 2) if last_tile else None,
            "result_files_busy_s": {name: round(s, 2) for name, s in writers[-1].seconds().items()} if writers else {}}
    return {"wall_s": wall, "cpu_s": cpu, "load_s": load_s, "summary": summary, "tail": tail,
            "intensity_range": run["intensity_range"],
            "model_channel": run["model_channel"], "labels": str(out / "labels.ome.tif"),
            "network_seconds": net_timer.to_dict(), **counts,
            "peak_rss_mb": _peak_rss_mb(), "peak_gpu_mb": _gpu_peak_mb(detector.device),
            "torch_threads": torch.get_num_threads(), "precision": detector.precision_note}


# --------------------------------------------------------------------------- child: naive torchvision

def build_naive_model(bundle):
    """The bundle's network with torchvision's defaults put back (docs/architecture.md); anchors stay the bundle's."""
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from cellseg.detection import load_network
    model = load_network(bundle)
    cfg = bundle.model
    # torchvision's own inference of the RPN and the RoI heads (cellseg's subclasses add no state, only a forward)
    model.rpn.__class__, model.roi_heads.__class__ = RegionProposalNetwork, RoIHeads
    model.transform = GeneralizedRCNNTransform(min_size=800, max_size=1333, image_mean=list(cfg.image_mean),
                                               image_std=list(cfg.image_std))
    model.roi_heads.detections_per_img = 100            # torchvision's box_detections_per_img default
    model.rpn._pre_nms_top_n = dict(training=2000, testing=1000)   # rpn_pre_nms_top_n_{train,test} defaults
    model.rpn._post_nms_top_n = dict(training=2000, testing=1000)  # rpn_post_nms_top_n_{train,test} defaults
    return model.eval()


def child_naive(spec: dict) -> dict:
    import tifffile
    import torch

    from cellseg.bundles import load_bundle
    from cellseg.detection import resolve_device
    from cellseg.geometry import plan_tiles
    from cellseg.planning import IntensityRange, load_protocol, select_channels, to_network_input
    from cellseg.run.counter import mask_threshold_for
    from cellseg.slides import open_slide
    from cellseg.util import StageTimer

    protocol = load_protocol(spec["protocol"]).replace(tile_size=spec["tile_size"], model=spec["model"])
    device = resolve_device(spec["device"])
    t = time.perf_counter()
    bundle = load_bundle(protocol.model)
    model = build_naive_model(bundle).to(device)
    load_s = time.perf_counter() - t
    score_thr = protocol.score_threshold if protocol.score_threshold is not None else bundle.score_threshold
    mask_thr = mask_threshold_for(bundle, protocol)
    timer = StageTimer()
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def timed(stage, fn):
        def wrapper(*a, **kw):
            sync()
            with timer(stage):
                r = fn(*a, **kw)
                sync()
            return r
        return wrapper

    # Sub-stages of "detect": torchvision's resize to min_size 800 and its full-canvas mask paste.
    model.transform.resize = timed("detect.resize", model.transform.resize)
    model.transform.postprocess = timed("detect.paste_full_canvas", model.transform.postprocess)
    with torch.inference_mode():
        model([torch.zeros(3, 128, 128, device=device)])  # warm-up: not timed
    timer.seconds.clear()
    counts = instrument(model, timer, device)
    _gpu_reset(device)

    rng = IntensityRange(*spec["intensity_range"])
    channel = spec["model_channel"]
    raw_detections = capped_tiles = 0
    started, cpu = time.perf_counter(), time.process_time()
    with open_slide(Path(spec["slide"])) as slide:
        H, W = slide.info.height, slide.info.width
        tiles = plan_tiles(H, W, spec["tile_px"], spec["halo_px"])
        label = np.zeros((H, W), np.uint32)
        next_id = 1
        for tile in tiles:
            with timer("read"):
                image = to_network_input(select_channels(slide.read_region(tile.read), channel), rng)
            with timer("detect"), torch.inference_mode():
                out = model([torch.from_numpy(image).to(device)])[0]
                sync()
            with timer("keep"):
                n_raw = int(out["scores"].shape[0])
                raw_detections += n_raw
                capped_tiles += n_raw >= model.roi_heads.detections_per_img
                keep = out["scores"] >= score_thr
                masks = out["masks"][keep][:, 0] > mask_thr          # (K, h, w) full-tile canvases
                scores = out["scores"][keep]
                if masks.shape[0]:
                    h, w = masks.shape[-2:]
                    area = masks.sum((1, 2)).float()
                    rows = (masks.sum(2).float() * torch.arange(h, device=device)).sum(1) / area.clamp(min=1)
                    cols = (masks.sum(1).float() * torch.arange(w, device=device)).sum(1) / area.clamp(min=1)
                    cr, cc = rows + tile.read.row0, cols + tile.read.col0
                    owned = ((area > 0) & (cr >= tile.core.row0) & (cr < tile.core.row1)
                             & (cc >= tile.core.col0) & (cc < tile.core.col1))
                    idx = torch.nonzero(owned)[:, 0]
                    idx = idx[torch.argsort(scores[idx])]             # ascending: higher score painted last
                    owned_masks = masks[idx].cpu().numpy()
                    view = label[tile.read.row0:tile.read.row1, tile.read.col0:tile.read.col1]
                    for m in owned_masks:
                        view[m] = next_id
                        next_id += 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak_gpu = _gpu_peak_mb(device)
    cells = next_id - 1
    visible = int(np.unique(label).size - (1 if (label == 0).any() else 0))
    out_path = Path(spec["out"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(out_path, label, tile=(256, 256), compression="zlib", compressionargs={"level": 1},
                     metadata=None)
    seconds = timer.to_dict()
    seconds["detect.network"] = round(timer.seconds["detect"] - timer.seconds["detect.resize"]
                                      - timer.seconds["detect.paste_full_canvas"], 3)
    seconds["total"] = round(wall, 3)
    return {"wall_s": wall, "cpu_s": cpu, "load_s": load_s, "cells": cells, "cells_visible_in_labels": visible,
            "tiles": len(tiles), "raw_detections": raw_detections, "tiles_at_100_cap": int(capped_tiles),
            "seconds": {k: v for k, v in seconds.items() if not k.startswith("net.")},
            "network_seconds": {k: v for k, v in seconds.items() if k.startswith("net.")}, **counts,
            "labels": str(out_path), "score_threshold": score_thr,
            "peak_rss_mb": _peak_rss_mb(), "peak_gpu_mb": peak_gpu, "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- parent

def run_child(kind: str, spec: dict, workdir: Path) -> dict:
    spec_path = workdir / f"{kind}.spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(spec_path)],
                         stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the {kind} run failed (exit {res.returncode}); its stderr is above")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _with_medians(runs: list[dict]) -> dict:
    """The last of `runs` (the same run repeated) with the median wall and CPU seconds of all of them."""
    return {**runs[-1], "wall_s": float(np.median([r["wall_s"] for r in runs])),
            "cpu_s": float(np.median([r["cpu_s"] for r in runs])), "wall_s_runs": [r["wall_s"] for r in runs]}


def correct_cells(pred_labels: str, gt) -> dict:
    from cellseg.evaluation import load_image_masks, match, pair_iou
    pred = next(iter(load_image_masks(pred_labels).values()))
    m = match(pred, gt, 0.5, ious=pair_iou(pred, gt))
    return {"correct": m.tp, "fp": m.fp, "fn": m.fn, "true_count": m.true_count, "precision": round(m.precision, 4),
            "recall": round(m.recall, 4), "f1": round(m.f1, 4),
            "mean_matched_iou": round(float(m.pair_iou.mean()), 4) if len(m.pair_iou) else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=ROOT / "example_slides" / "fluo_mosaic.ome.tif")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", type=Path, required=False, help="write the figures here")
    p.add_argument("--tiles", type=int, default=None, help="limit both runs to a region of at most N whole tiles")
    p.add_argument("--protocol", default="fluorescence-nuclei")
    p.add_argument("--model", default=None, help="bundle (default: the protocol's)")
    p.add_argument("--tile-size", type=int, default=None, help="tile core px (default: the protocol's)")
    p.add_argument("--tissue", choices=["unet", "otsu", "none"], default=None,
                   help="cellseg's tissue prefilter (default: the protocol's)")
    p.add_argument("--workdir", type=Path, default=None, help="keep crops and results here (default: a temp dir)")
    p.add_argument("--tta", action="store_true", help="cellseg with test-time augmentation (cellseg count --tta)")
    p.add_argument("--precisions", default=None,
                   help="cellseg runs, comma-separated, in this order (default on a CPU: fp32, then bf16 where the "
                        "CPU has native bf16; the last is the full report's); on a GPU: auto (fp16). A CPU variant "
                        "PRECISION:1stream runs one forward pass at a time (no detection.streams), e.g. "
                        "--precisions fp32:1stream,fp32; PRECISION:switchMS counts with the interpreter's switch "
                        "interval at MS ms (CPython's default 5, cellseg's 0.5: util.threads.quick_handoff), e.g. "
                        "--precisions auto:switch5,auto on a GPU")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of every run, interleaved (cellseg variants, then naive, each round): seconds are "
                        "each run's median, the ratio the ratio of medians, with each round's ratio printed too "
                        "(2-core machines vary up to 2x from minute to minute)")
    p.add_argument("--isa", choices=sorted(ISA_CAPS), default="native",
                   help="avx2: cap every run's kernels at AVX2 (the code paths of a CPU without AVX-512 or bf16, "
                        "such as a Zen 3); avx512: at AVX-512 without VNNI, bf16 or AMX (those of a Skylake Xeon)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.update(ISA_CAPS[args.isa])    # before torch is imported here, and inherited by every child run
    if args.child:
        kind, spec_path = args.child
        spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
        result = child_cellseg(spec) if kind == "cellseg" else child_naive(spec)
        print(json.dumps(result, default=float))
        return

    from cellseg.bundles import load_bundle
    from cellseg.detection import cpu_has_native_bf16, cpu_model
    from cellseg.geometry import grid_shape
    from cellseg.planning import choose_scale, load_protocol, tile_geometry
    from cellseg.slides import open_slide

    protocol = load_protocol(args.protocol).replace(tile_size=args.tile_size, model=args.model,
                                                    tissue_method=args.tissue)
    bundle = load_bundle(protocol.model)
    with open_slide(args.slide) as slide:
        info = slide.info
    scale = choose_scale(bundle.nucleus_diameter_px, None, protocol, info.mpp)
    tile_px, halo_px = tile_geometry(protocol, scale)
    n_rows, n_cols = grid_shape(info.height, info.width, tile_px)
    r, c = choose_region(n_rows, n_cols, args.tiles)
    height, width = min(r * tile_px, info.height), min(c * tile_px, info.width)
    gt_path = _labels_next_to(args.slide)

    with tempfile.TemporaryDirectory(prefix="cellseg-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        slide_path, region = args.slide, "whole slide"
        if (r, c) != (n_rows, n_cols):
            slide_path = work / "region.ome.tif"
            crop_slide(args.slide, slide_path, height, width)
            region = f"top-left {r} x {c} tiles = rows 0:{height}, cols 0:{width} (cropped copy)"
            if gt_path:
                crop_labels(gt_path, work / "region_labels.tif", height, width)
                gt_path = work / "region_labels.tif"
        mp = height * width / 1e6
        print(f"slide {args.slide.name}: {info.height} x {info.width} px; analysed {region}: {height} x {width} px = "
              f"{mp:.3f} MP, {r * c} of {n_rows * n_cols} tiles of {tile_px} px + {halo_px} px halo; "
              f"device {args.device}; model {bundle.name} ({bundle.weights_sha256[:12]})")
        common = {"slide": str(slide_path), "protocol": args.protocol, "model": protocol.model,
                  "tile_size": protocol.tile_size, "device": args.device, "tissue": protocol.tissue_method}
        precisions = (args.precisions.split(",") if args.precisions else
                      ["auto"] if args.device == "cuda" else ["fp32"] + (["bf16"] if cpu_has_native_bf16() else []))
        rounds: list[tuple[dict, dict]] = []   # (cellseg runs by precision, naive run), one per round
        for k in range(args.rounds):
            runs = {}
            for precision in precisions:
                runs[precision] = run_child("cellseg", {**common, "out": str(work / f"cellseg_out_{precision.replace(':', '_')}"),
                                                        "tta": args.tta, "precision": precision}, work)
                done = runs[precision]     # said at once: a run cut short by a time limit still leaves figures
                print(f"  round {k + 1}: cellseg {precision} ({done['precision']}): {done['wall_s']:.1f} s, "
                      f"{done['summary']['cell_count']} cells, "
                      f"{done['summary']['tissue_area_px'] / 1e6 / done['wall_s']:.3f} MP of tissue/s, "
                      f"stages {done['summary']['seconds']}", flush=True)
            summary = runs[precisions[-1]]["summary"]
            if (summary["scale"]["tile_px"], summary["scale"]["halo_px"]) != (tile_px, halo_px) and k == 0:
                # the model's nuclei and the slide's differ in size: cellseg resamples, the naive loop cannot
                print(f"  note: cellseg resampled by {summary['scale']['factor']:.3f} (tiles of "
                      f"{summary['scale']['tile_px']}+{summary['scale']['halo_px']} px); the naive loop runs at the "
                      f"slide's own scale, {tile_px}+{halo_px} px", flush=True)
            naive_run = run_child("naive", {**common, "out": str(work / "naive_labels.tif"), "tile_px": tile_px,
                                            "halo_px": halo_px,
                                            "intensity_range": runs[precisions[-1]]["intensity_range"],
                                            "model_channel": runs[precisions[-1]]["model_channel"]}, work)
            print(f"  round {k + 1}: naive: {naive_run['wall_s']:.1f} s; ratio " + ", ".join(
                f"{precision} {naive_run['wall_s'] / runs[precision]['wall_s']:.2f}x" for precision in precisions),
                flush=True)
            rounds.append((runs, naive_run))
        # each variant: its last round's run (stages, cells, labels) with the median wall and CPU seconds
        variants = {precision: _with_medians([r[precision] for r, _ in rounds]) for precision in precisions}
        nv = _with_medians([n for _, n in rounds])
        round_ratios = {precision: [round(n["wall_s"] / r[precision]["wall_s"], 3) for r, n in rounds]
                        for precision in precisions}
        cs = variants[precisions[-1]]
        summary = cs["summary"]
        n_tiles, naive_tiles = summary["tiles_total"], nv["tiles"]     # differ where cellseg resampled the slide
        analysed = n_tiles - summary["tiles_skipped"]
        cs_cells = summary["cell_count"]
        tissue_mp = summary["tissue_area_px"] / 1e6
        print(f"  tissue ({summary['tissue_method']}): {tissue_mp:.3f} MP of {mp:.3f}; cellseg analysed {analysed} of "
              f"{n_tiles} tiles, the naive run all {naive_tiles} of its own")
        result = {
            "slide": str(args.slide), "analysed_region": region, "height_px": height, "width_px": width,
            "megapixels": round(mp, 4), "tissue_method": summary["tissue_method"],
            "tissue_megapixels": round(tissue_mp, 4), "tiles": n_tiles, "tiles_analysed": analysed, "tile_px": tile_px,
            "halo_px": halo_px, "device": args.device, "model": bundle.name, "protocol": args.protocol,
            "tta": args.tta,
            "cpu_count": os.cpu_count(), "torch_threads": cs["torch_threads"], "cpu": cpu_model(),
            "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
            "rounds": args.rounds, "round_ratios": round_ratios,
            "mp_per_s": round(tissue_mp / cs["wall_s"], 4),
            "seconds_total": round(cs["wall_s"], 3), "cpu_seconds": round(cs["cpu_s"], 2),
            "seconds": {k: summary["seconds"].get(k, 0.0) for k in ("read", "tissue", "detect", "merge", "measure", "write",
                                                                    "total")},
            "tiles_per_s": round(n_tiles / cs["wall_s"], 4),
            "cells": cs_cells, "cells_per_s": round(cs_cells / cs["wall_s"], 2),
            "peak_rss_mb": round(cs["peak_rss_mb"], 1),
            "peak_gpu_mb": None if cs["peak_gpu_mb"] is None else round(cs["peak_gpu_mb"], 1),
            "model_load_s": round(cs["load_s"], 2),
            "network_seconds": cs["network_seconds"], "mask_head_rois": cs["mask_head_rois"], "tail": cs["tail"],
            "naive": {
                "what": "bundle weights + torchvision defaults: GeneralizedRCNNTransform(800, 1333), full-canvas "
                        "paste_masks_in_image, detections_per_img 100, RPN top-n 1000/1000 at test; bundle anchors, "
                        "mean/std, box NMS and score threshold kept; 1 tile per call; centroid-in-core, no dedupe; "
                        "no measurement, no result files",
                "mp_per_s": round(tissue_mp / nv["wall_s"], 4), "seconds_total": round(nv["wall_s"], 3),
                "cpu_seconds": round(nv["cpu_s"], 2),
                "seconds": nv["seconds"], "tiles": naive_tiles, "tiles_per_s": round(naive_tiles / nv["wall_s"], 4),
                "cells": nv["cells"], "cells_visible_in_labels": nv["cells_visible_in_labels"],
                "cells_per_s": round(nv["cells"] / nv["wall_s"], 2),
                "raw_detections": nv["raw_detections"], "tiles_at_100_cap": nv["tiles_at_100_cap"],
                "peak_rss_mb": round(nv["peak_rss_mb"], 1),
                "peak_gpu_mb": None if nv["peak_gpu_mb"] is None else round(nv["peak_gpu_mb"], 1),
                "model_load_s": round(nv["load_s"], 2),
                "network_seconds": nv["network_seconds"], "mask_head_rois": nv["mask_head_rois"],
            },
        }
        result["naive_mp_per_s"] = result["naive"]["mp_per_s"]
        result["ratio"] = round(result["mp_per_s"] / result["naive_mp_per_s"], 3)
        result["ratio_per_tile"] = round((nv["wall_s"] / naive_tiles) / (cs["wall_s"] / max(analysed, 1)), 3)
        # CPU seconds (all threads of each run's process): less sensitive to other work on a shared machine.
        result["ratio_cpu_time"] = round(nv["cpu_s"] / cs["cpu_s"], 3) if cs["cpu_s"] else None
        # Like for like: the stages both runs have (read + network + mask handling + keeping cells);
        # cellseg's measure and write (cells.csv, COCO, label pyramid, overlay, histogram) have no naive twin.
        cs_core = sum(summary["seconds"].get(k, 0.0) for k in ("read", "detect", "merge"))
        nv_core = sum(nv["seconds"].get(k, 0.0) for k in ("read", "detect", "keep"))
        result["ratio_read_detect_keep"] = round(nv_core / cs_core, 3) if cs_core else None
        result["naive_cells"] = nv["cells"]
        result["precision"] = cs["precision"]
        result["variants"] = {}
        for precision, v in variants.items():
            result["variants"][precision] = {
                "precision": v["precision"], "mp_per_s": round(tissue_mp / v["wall_s"], 4),
                "ratio": round(tissue_mp / v["wall_s"] / result["naive_mp_per_s"], 3),
                "seconds_total": round(v["wall_s"], 3), "cpu_seconds": round(v["cpu_s"], 2),
                "seconds": {k: v["summary"]["seconds"].get(k, 0.0) for k in ("read", "tissue", "detect", "merge",
                                                                            "measure", "write", "total")},
                "cells": v["summary"]["cell_count"], "peak_rss_mb": round(v["peak_rss_mb"], 1),
                "network_seconds": v["network_seconds"], "tail": v["tail"], "labels": v["labels"]}
        if gt_path:
            from cellseg.evaluation import load_image_masks
            gt = next(iter(load_image_masks(gt_path).values()))
            result["ground_truth"] = str(gt_path if gt_path.parent != work else f"{_labels_next_to(args.slide)} "
                                                                                  f"(cropped to the region)")
            result["true_cells"] = int((~gt.iscrowd).sum())
            result["cellseg_eval"] = correct_cells(cs["labels"], gt)
            result["naive_eval"] = correct_cells(nv["labels"], gt)
            result["correct_cells"] = result["cellseg_eval"]["correct"]
            result["naive_correct_cells"] = result["naive_eval"]["correct"]
            for v in result["variants"].values():
                v["eval"] = correct_cells(v.pop("labels"), gt)
        else:
            result["ground_truth"] = None

    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


def print_report(r: dict) -> None:
    nv = r["naive"]

    def gpu(x):
        return "n/a (CPU)" if x is None else f"{x:.0f} MB"

    print(f"{'':24} {'cellseg':>12} {'naive':>12}")
    print(f"{'tissue MP/s (end to end)':24} {r['mp_per_s']:>12.4f} {nv['mp_per_s']:>12.4f}   ratio {r['ratio']:.2f}x")
    print(f"{'tiles analysed':24} {r['tiles_analysed']:>12} {nv['tiles']:>12}   "
          f"seconds per analysed tile: ratio {r['ratio_per_tile']:.2f}x")
    print(f"{'seconds':24} {r['seconds_total']:>12.1f} {nv['seconds_total']:>12.1f}")
    print(f"{'CPU seconds':24} {r['cpu_seconds']:>12.1f} {nv['cpu_seconds']:>12.1f}   ratio {r['ratio_cpu_time']:.2f}x")
    print(f"{'tiles/s':24} {r['tiles_per_s']:>12.3f} {nv['tiles_per_s']:>12.3f}")
    print(f"{'cells':24} {r['cells']:>12} {nv['cells']:>12}")
    print(f"{'cells/s':24} {r['cells_per_s']:>12.1f} {nv['cells_per_s']:>12.1f}")
    if r.get("ground_truth"):
        ce, ne = r["cellseg_eval"], r["naive_eval"]
        print(f"{'correct (IoU>=0.5)':24} {ce['correct']:>12} {ne['correct']:>12}   of {r['true_cells']} true cells")
        print(f"{'FP / FN':24} {str(ce['fp']) + ' / ' + str(ce['fn']):>12} {str(ne['fp']) + ' / ' + str(ne['fn']):>12}")
        print(f"{'F1':24} {ce['f1']:>12.3f} {ne['f1']:>12.3f}")
    print(f"{'peak RSS':24} {r['peak_rss_mb']:>9.0f} MB {nv['peak_rss_mb']:>9.0f} MB")
    print(f"{'peak GPU':24} {gpu(r['peak_gpu_mb']):>12} {gpu(nv['peak_gpu_mb']):>12}")
    print("cellseg seconds by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items()))
    print("  (read + detect run in a thread of their own, a batch ahead of merge + measure + write: the stages overlap,"
          " and the busier of the two paths sets the wall time)")
    tail = r.get("tail") or {}
    if tail.get("after_last_tile_s") is not None:
        print(f"cellseg after its last tile: {tail['after_last_tile_s']:.2f} s (the result files finishing, the label "
              f"images, the report); the result files' busy seconds: "
              + ", ".join(f"{k} {v:.2f}" for k, v in tail["result_files_busy_s"].items()))
    print("naive seconds by stage:   " + ", ".join(f"{k} {v:.2f}" for k, v in nv["seconds"].items()))
    print("network parts, cellseg: " + ", ".join(f"{k[4:]} {v:.2f}" for k, v in r["network_seconds"].items())
          + f"; {r['mask_head_rois']} RoIs through the mask head")
    print("network parts, naive:   " + ", ".join(f"{k[4:]} {v:.2f}" for k, v in nv["network_seconds"].items())
          + f"; {nv['mask_head_rois']} RoIs through the mask head")
    print("  (seconds summed over the forward passes that run side by side on a CPU: thread-seconds)")
    print("  (roi_heads includes mask_branch = RoIAlign + mask head + predictor, on every detection above "
          "roi_heads.score_thresh (cellseg: the bundle threshold; naive: 0.05); rpn = objectness, proposals, NMS)")
    print(f"like for like (read + detect + merge/keep, no measure/write): naive / cellseg = "
          f"{r['ratio_read_detect_keep']:.2f}x")
    print(f"naive: {nv['raw_detections']} raw detections, {nv['tiles_at_100_cap']} of {r['tiles']} tiles hit the "
          f"100-detection cap; {nv['cells_visible_in_labels']} of {nv['cells']} kept cells visible in its label image")
    print(f"tissue {r['tissue_method']}: {r['tissue_megapixels']:.3f} MP of {r['megapixels']:.3f}; {r['cpu_count']} CPU cores, torch threads {r['torch_threads']}, "
          f"1-min load average at the end {r['load_avg_1min_at_end']}")
    print(f"CPU {r['cpu']}; the full report above is cellseg in {r['precision']}; seconds are medians of "
          f"{r['rounds']} interleaved round(s); each round's ratio: "
          + "; ".join(f"{k} " + ", ".join(f"{x:.2f}x" for x in v) for k, v in r["round_ratios"].items()))
    print(f"{'variant':<16}{'MP/s':>8}{'ratio':>8}{'seconds':>9}{'detect s':>10}{'tail s':>8}{'cells':>7}{'F1':>7}"
          f"{'peak RSS':>10}")
    rows = [(f"cellseg {name}", v["mp_per_s"], v["ratio"], v["seconds_total"], v["seconds"]["detect"],
             (v.get("tail") or {}).get("after_last_tile_s"), v["cells"], v.get("eval", {}).get("f1"), v["peak_rss_mb"])
            for name, v in r["variants"].items()]
    rows.append(("naive", nv["mp_per_s"], 1.0, nv["seconds_total"], nv["seconds"].get("detect", 0.0), None,
                 nv["cells"], r.get("naive_eval", {}).get("f1"), nv["peak_rss_mb"]))
    for name, mps, ratio, secs, det, tail, cells, f1, rss in rows:
        f1_text = "" if f1 is None else f"{f1:.3f}"
        tail_text = "" if tail is None else f"{tail:.1f}"
        print(f"{name:<16}{mps:>8.3f}{ratio:>7.2f}x{secs:>9.1f}{det:>10.1f}{tail_text:>8}{cells:>7}{f1_text:>7}"
              f"{rss:>7.0f} MB")
    print("  (tail s: from the count's last tile to its end: the result files finishing, the label images, the report)")


if __name__ == "__main__":
    main()

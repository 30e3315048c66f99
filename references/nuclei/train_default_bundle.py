"""Train the default nuclei bundle on DSB2018 + TNBC, holding out whole acquisition groups and patients.

The recipe (recipe.py): DSB2018 images grouped by acquisition and TNBC by patient (datasets.py), at least 15 % of
each modality's groups held out whole and written to OUT/split.json, so that validate_bundle.py scores exactly the
held-out images; modalities drawn by fixed shares; augmentation for stains, focus, noise, contrast, dim nuclei and
zoom (cellseg.training.augment). Resumable across runs (--resume); checkpoints by steps and by wall time. From the
repository's root:

    # from scratch on a GPU (scripts/gpu_train.sh runs this on a lent machine, data from a pack):
    python -m references.nuclei.train_default_bundle --out runs/gpu --device cuda --backbone resnet34 \
        --batch-size 16 --crop 512 --workers 12 --schedule-minutes 24 --checkpoint-minutes 3
    # continue the shipped bundle on a CPU with the new data and augmentation:
    python -m references.nuclei.train_default_bundle --out runs/ft --init cellseg/models/nuclei --lr 1e-4 \
        --steps 3000 --split runs/split.json --threads 2 [--resume]

Data: --data-root holds dsb2018-train/ and tnbc-train/ (each with manifest.csv, images/, labels/): the project's
../shared/data, or a pack made by pack_training_data.py (what travels to a GPU machine).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shlex
import sys
from pathlib import Path

import torch

from cellseg.errors import CellsegError
from cellseg.training import TrainSettings
from cellseg.training.maskrcnn import KEPT_SETTINGS_FILE

from .datasets import PROJECT_DATA_ROOT
from .plot_heldout import MODALITIES
from .recipe import parse_augmentation, parse_mix, run_recipe

REPOSITORY = Path(__file__).resolve().parents[2]


HELDOUT_COLUMNS = ["step", *MODALITIES, "all", "median_count_error_all", "mean_of_modalities"]


def score_snapshot(snapshot: Path, step: int, *, out: Path, data_root: Path, per_modality: int,
                   code: Path = REPOSITORY) -> None:
    """Score a training snapshot on a fixed subset of the held-out images through the real pipeline
    (heldout_metrics, on `code`), then record the score (record_snapshot_score)."""
    record_snapshot_score(snapshot, step, heldout_metrics(snapshot, out=out, data_root=data_root,
                                                          per_modality=per_modality, code=code), out)


def heldout_metrics(snapshot: Path, *, out: Path, data_root: Path, per_modality: int,
                    code: Path = REPOSITORY) -> dict:
    """validate_bundle.py's metrics of a snapshot on the first `per_modality` held-out images of each modality, run
    from `code` (a checkout, or frozen_code's copy of one); its figures stay in OUT/heldout/<snapshot>, its
    predictions do not, and its output goes to OUT/heldout/<snapshot>.log."""
    import json
    import shutil
    import subprocess
    val_dir = out / "heldout" / snapshot.name
    shutil.rmtree(val_dir, ignore_errors=True)
    val_dir.parent.mkdir(parents=True, exist_ok=True)
    # validate_bundle.py as a module of `code`, whatever the working directory the training was started from:
    # `python -m` puts its working directory first on sys.path, so it runs in `code`, with absolute paths
    python_path = os.pathsep.join(filter(None, [str(code.resolve()), os.environ.get("PYTHONPATH")]))
    log_path = val_dir.with_name(snapshot.name + ".log")
    with open(log_path, "w") as log_file:
        done = subprocess.run([sys.executable, "-m", "references.nuclei.validate_bundle",
                               "--bundle", str(snapshot.resolve()), "--data-root", str(data_root.resolve()),
                               "--out", str(val_dir.resolve()), "--device", "cpu", "--per-modality", str(per_modality)],
                              cwd=code, stdout=log_file, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": python_path})
    if done.returncode != 0:
        last = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise subprocess.CalledProcessError(done.returncode, f"validate_bundle (log {log_path}: {' '.join(last)})")
    metrics = json.loads((val_dir / "metrics.json").read_text())
    shutil.rmtree(val_dir / ".work", ignore_errors=True)
    for folder in val_dir.iterdir():     # the predictions are re-made at will; keep the figures
        if folder.is_dir():
            shutil.rmtree(folder)
    return metrics


def frozen_code(out: Path) -> Path:
    """A copy of this checkout's code (cellseg, references without its candidate bundles, protocols) in OUT.code
    beside OUT (as train_long.sh keeps OUT.settings and OUT.log: OUT itself must be new or empty for a new run), made
    when the trainer starts: its held-out scorings run on it (heldout_metrics), so that a working tree edited
    during a scoring (a session's work beside the run) cannot fail one half-way (on 2026-11-27 one failed while
    report.py and report_plots.py were being changed: processes a scoring starts import the tree as it is then), and every point of the curve is scored by the code the
    run was (re)started with. `--rescore` scores with the checkout as it is."""
    import shutil
    code, staged = out.with_name(out.name + ".code"), out.with_name(out.name + ".code.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "candidates")
    for name in ("cellseg", "references", "protocols"):
        shutil.copytree(REPOSITORY / name, staged / name, ignore=ignore)
    shutil.rmtree(code, ignore_errors=True)
    staged.rename(code)
    return code


def record_snapshot_score(snapshot: Path, step: int, metrics: dict, out: Path) -> dict:
    """Put a scored snapshot's AP50 pooled per modality (validate_bundle.py's `metrics`) on the curve, OUT/heldout.csv
    (replacing an earlier score of its step), move it to OUT/scored (unless it is there: a rescore): out of
    OUT/snapshots, which holds only unscored ones (score_leftover_snapshots), and kept, so that any point of the
    curve can be interpolated with the start later (`python -m references.nuclei.interpolate_bundles`; ~31 MB a
    snapshot), and copy the curve's best (keep_best) to OUT/best. Returns the row."""
    import csv
    row = {"step": step}
    for name in (*MODALITIES, "all"):
        row[name] = metrics.get(name, {}).get("ap50_tp_fp_fn_pooled")
    row["median_count_error_all"] = metrics["all"]["median_rel_count_error"]
    per = [row[m] for m in MODALITIES if row[m] is not None]
    row["mean_of_modalities"] = round(sum(per) / len(per), 4)
    log_path = out / "heldout.csv"
    rows = []
    if log_path.is_file():
        with open(log_path, newline="") as f:
            rows = list(csv.DictReader(f))
    rows = sorted([r for r in rows if int(r["step"]) != step] + [row], key=lambda r: int(r["step"]))
    tmp = log_path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HELDOUT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(log_path)
    logging.info("held-out at step %d: %s", step, row)
    if snapshot.resolve() != (out / "scored" / snapshot.name).resolve():
        _move_into(snapshot, out / "scored")
    keep_best(out, rows)
    return row


def _move_into(snapshot: Path, folder: Path) -> Path:
    """Move a snapshot folder into `folder` (replacing an older one of its name there); returns where it now is."""
    import shutil
    kept = folder / snapshot.name
    shutil.rmtree(kept, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    snapshot.rename(kept)
    return kept


def keep_best(out: Path, rows: list[dict]) -> None:
    """Copy the scored snapshot with the highest mean AP50 over the modalities (the earliest of equals) to OUT/best,
    unless OUT/best holds its weights already."""
    import shutil
    best = max(rows, key=lambda r: (float(r["mean_of_modalities"]), -int(r["step"])))
    snapshot = out / "scored" / f"step{int(best['step']):07d}"
    if not snapshot.is_dir():
        return
    held = out / "best" / "weights.safetensors"
    if held.is_file() and held.read_bytes() == (snapshot / "weights.safetensors").read_bytes():
        return
    staged = out / "best.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(snapshot, staged)
    shutil.rmtree(out / "best", ignore_errors=True)
    staged.rename(out / "best")
    logging.info("step %s is the best so far (mean AP50 %s): %s", best["step"], best["mean_of_modalities"],
                 out / "best")


def rescore_snapshots(out: Path, *, data_root: Path, per_modality: int) -> None:
    """Score every kept snapshot (OUT/scored) again and rewrite its point of the curve: after the scoring itself
    changed (how thresholds are chosen, the sweep), so that the curve stays one measurement. Snapshots whose
    scoring failed (OUT/unscored, score_leftover_snapshots) are scored too, and join OUT/scored."""
    snapshots = [*(out / "scored").glob("step*"), *(out / "unscored").glob("step*")]
    for snapshot in sorted(snapshots, key=lambda p: p.name):
        if snapshot.is_dir() and snapshot.name[4:].isdigit():
            logging.info("rescoring %s", snapshot)
            record_snapshot_score(snapshot, int(snapshot.name[4:]),
                                  heldout_metrics(snapshot, out=out, data_root=data_root, per_modality=per_modality),
                                  out)


def score_leftover_snapshots(out: Path, score) -> None:
    """Score the snapshots an earlier run of OUT left unscored (`score(folder, step)`, e.g. score_snapshot): scoring
    moves a snapshot out of OUT/snapshots, so one still there was being scored when that run was killed (a session's end; the
    checkpoint had moved past its step, so no later snapshot stands in for it). One that cannot be scored is set aside
    (score_or_set_aside)."""
    for snapshot in sorted((out / "snapshots").glob("step*")):
        if snapshot.is_dir() and snapshot.name[4:].isdigit():
            logging.info("scoring %s, left unscored by the last run", snapshot)
            score_or_set_aside(snapshot, int(snapshot.name[4:]), score, out)


def score_or_set_aside(snapshot: Path, step: int, score, out: Path) -> None:
    """score(snapshot, step); a snapshot that cannot be scored does not stop the run: a whole bundle (the weights
    its model.toml records) is kept in OUT/unscored, to be scored by `--rescore` (the scoring can fail for reasons
    of its own: on 2026-11-27 a working tree edited during a scoring failed it, and a good snapshot was removed); a
    half-written folder (a run killed while writing it) is removed."""
    import shutil
    import subprocess

    from cellseg.bundles import load_bundle
    try:
        score(snapshot, step)
    except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as e:
        try:
            load_bundle(snapshot)
        except CellsegError as broken:
            logging.warning("could not score %s (%s: %s), a half-written bundle (%s); removed", snapshot,
                            type(e).__name__, e, broken)
            shutil.rmtree(snapshot, ignore_errors=True)
            return
        kept = _move_into(snapshot, out / "unscored")
        logging.warning("could not score %s (%s: %s); kept in %s: `python -m references.nuclei.train_default_bundle "
                        "--out %s --rescore` scores it", snapshot, type(e).__name__, e, kept, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=PROJECT_DATA_ROOT)
    p.add_argument("--split", type=Path, default=None,
                   help="an existing split.json (default: made from the data, or OUT/split.json with --resume)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=None, help="stop this run after this much wall time")
    p.add_argument("--schedule-minutes", type=float, default=None,
                   help="learning-rate schedule length in wall time over all runs (GPU leases)")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--backbone", default=None, help="resnet18 | resnet34 | resnet50 (from scratch; default resnet18)")
    p.add_argument("--aspect-ratios", default=None, metavar="R,R,...",
                   help="the RPN's anchor ratios (height / width), e.g. 0.33,0.5,1,2,3 for elongated nuclei; from a "
                        "bundle with others, each new ratio's outputs start as its nearest old one's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=0, help="crop-making processes (GPU runs)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init", default="none", help="none | coco | coco:FILE | BUNDLE to fine-tune")
    p.add_argument("--mix", default=None, help="draw shares by modality, e.g. fluorescence=0.45,he_breast=0.25,...")
    p.add_argument("--augment", default=None,
                   help="augmentation settings changed from cellseg.training.Augmentation's, e.g. invert_p=0.2")
    p.add_argument("--limit", type=int, default=None, help="only the first N training images (smoke test)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast where the processor has it natively (auto), or as given")
    p.add_argument("--weight-average", type=float, default=None, metavar="DECAY",
                   help="the bundles get an exponential moving average of the weights with this decay per step "
                        "(e.g. 0.999: about the last 1,000 steps) instead of the last step's")
    p.add_argument("--backbone-lr-scale", type=float, default=1.0, metavar="S",
                   help="the ResNet body trains at S times the schedule's rate (the FPN and heads at the full rate): "
                        "e.g. 0.1 to keep the features a bundle has while its heads adapt; 0 freezes it")
    p.add_argument("--keep-init-settings", action="store_true",
                   help="the bundles written (snapshots, best, final) keep --init's [inference] and [scale]: its mask "
                        "and score thresholds and the nucleus size it counts at, so that a snapshot is scored as it "
                        "would ship, not at the training mix's median size (kept in OUT/kept_settings.toml: a resume "
                        "keeps them without the flag)")
    p.add_argument("--snapshot-every", type=int, default=None,
                   help="every N steps, score a snapshot on held-out images (OUT/heldout.csv) and keep the best in "
                        "OUT/best")
    p.add_argument("--heldout-per-modality", type=int, default=24,
                   help="held-out images of each modality a snapshot is scored on (a fixed subset)")
    p.add_argument("--rescore", action="store_true",
                   help="train nothing: score every snapshot OUT/scored keeps again, and those whose scoring failed "
                        "(OUT/unscored), and rewrite the curve (after the scoring changed); may run beside the "
                        "training of OUT")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.rescore:
        rescore_snapshots(args.out, data_root=args.data_root, per_modality=args.heldout_per_modality)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = None
    if args.backbone:
        from cellseg.bundles import ModelConfig
        from cellseg.training.warm_start import starts_from_bundle
        if starts_from_bundle(args.init) and not args.resume:
            # a deeper backbone than the bundle's: the bundle's settings, its weights, the new blocks as identity
            import dataclasses

            from cellseg.bundles import load_bundle
            model_cfg = dataclasses.replace(load_bundle(args.init).model, backbone=args.backbone)
        elif args.init != "none":
            p.error("--backbone is for a training from scratch (--init none) or deepening a bundle (--init BUNDLE)")
        else:
            model_cfg = ModelConfig(backbone=args.backbone)
    if args.aspect_ratios:
        import dataclasses

        from cellseg.bundles import ModelConfig, load_bundle
        from cellseg.training.warm_start import starts_from_bundle
        try:
            ratios = tuple(float(r) for r in args.aspect_ratios.split(","))
        except ValueError:
            p.error(f"expected --aspect-ratios as numbers separated by commas (e.g. 0.33,0.5,1,2,3), found "
                    f"{args.aspect_ratios!r}")
        if not ratios or min(ratios) <= 0:
            p.error(f"expected positive anchor ratios, found {args.aspect_ratios!r}")
        base = model_cfg or (load_bundle(args.init).model if starts_from_bundle(args.init) and not args.resume
                             else ModelConfig())
        model_cfg = dataclasses.replace(base, aspect_ratios=ratios)
    try:
        augmentation = parse_augmentation(args.augment)
        settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                                 warmup=args.warmup, minutes=args.minutes, checkpoint_minutes=args.checkpoint_minutes,
                                 schedule_minutes=args.schedule_minutes, workers=args.workers,
                                 precision=args.precision, snapshot_every=args.snapshot_every,
                                 augmentation=augmentation, weight_average_decay=args.weight_average,
                                 backbone_lr_scale=args.backbone_lr_scale)
    except CellsegError as e:
        p.error(str(e))
    keep_settings_of = None
    if args.keep_init_settings and not args.resume:
        from cellseg.training.warm_start import starts_from_bundle
        if not starts_from_bundle(args.init):
            p.error(f"expected --init to be a bundle folder with --keep-init-settings, found {args.init!r}")
        from cellseg.bundles import find_bundle
        try:
            keep_settings_of = find_bundle(args.init)
        except CellsegError as e:
            p.error(str(e))
    elif args.keep_init_settings and not (args.out / KEPT_SETTINGS_FILE).is_file():
        p.error(f"expected {args.out / KEPT_SETTINGS_FILE} with --keep-init-settings --resume (written when a run "
                f"starts with the flag), found none: this run started without it")
    on_snapshot = None
    if args.snapshot_every:
        score = functools.partial(score_snapshot, out=args.out, data_root=args.data_root,
                                  per_modality=args.heldout_per_modality, code=frozen_code(args.out))
        # a scoring that fails sets the snapshot aside and the training goes on (it ended the run before)
        on_snapshot = functools.partial(score_or_set_aside, score=score, out=args.out)
    if on_snapshot is not None and args.resume:
        score_leftover_snapshots(args.out, score)
    try:
        run_recipe(args.data_root, args.out, settings, split_file=args.split, init=args.init,
                   mix=parse_mix(args.mix), model_cfg=model_cfg, resume=args.resume, device=args.device,
                   limit=args.limit, on_snapshot=on_snapshot, keep_settings_of=keep_settings_of,
                   reproduce="python -m references.nuclei.train_default_bundle " + shlex.join(sys.argv[1:]))
    except CellsegError as e:
        sys.exit(f"train_default_bundle: error: {e}")


if __name__ == "__main__":
    main()

"""The model card (README.md of a nuclei bundle) for people, rendered from its model.toml.

Used by validate_bundle.py --write-card. Data and licences (TNBC is CC BY 4.0: credited here), the recipe of every
training stage with its hardware and time, the hold-out split, and the validation figures per modality.
"""

from __future__ import annotations

from pathlib import Path

from .datasets import PROTOCOL_MODALITIES
from .plot_heldout import MODALITIES

LABELS = {"fluorescence": "fluorescence (DSB2018)", "stained_tissue": "stained tissue (DSB2018, H&E-like)",
          "brightfield_gray": "grayscale brightfield (DSB2018)", "he_breast": "H&E breast cancer, 40x (TNBC)",
          "fluorescence_kromp": "DAPI sections, imprints, cytospins (Kromp)", "he_nuinsseg": "H&E, other organs (NuInsSeg)",
          "all": "all"}
TNBC_CREDIT = ("TNBC nuclei (Naylor P, Laé M, Reyal F, Walter T, \"Segmentation of Nuclei in Histopathology Images by "
               "Deep Regression of the Distance Map\", IEEE Transactions on Medical Imaging 38(2):448-459, 2019; "
               "Zenodo record 1175282), licence CC BY 4.0, relabelled to consecutive ids and converted to COCO")
DSB_CREDIT = ("DSB2018 stage1_train (BBBC038) with community mask fixes (Caicedo et al., \"Nucleus segmentation "
              "across imaging experiments: the 2018 Data Science Bowl\", Nature Methods 16, 1247-1253, 2019), "
              "licence CC0 1.0")


def _fmt(x, pct=False):
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f} %" if pct == "signed" else f"{100 * x:.1f} %" if pct else f"{x:.3f}"


def figures_table(m: dict) -> str:
    rows = ["| modality | images | AP50 pooled | AP50 mean | F1 | DSB2018 score | COCO mask AP | median count error "
            "| count bias |", "|---|---|---|---|---|---|---|---|---|"]
    for key, label in LABELS.items():
        for suffix, note in (("", ""), ("_unseen", ", images no training stage saw")):
            g = m.get(key + suffix)
            if not g:
                continue
            rows.append(f"| {label}{note} | {g['images']} | {_fmt(g['ap50_tp_fp_fn_pooled'])} | "
                        f"{_fmt(g['ap50_tp_fp_fn_mean_over_images'])} | {_fmt(g['f1_pooled'])} | "
                        f"{_fmt(g.get('dsb_score_mean_over_images'))} | {_fmt(g['coco_mask_ap'])} | "
                        f"{_fmt(g['median_rel_count_error'], pct=True)} | {_fmt(g.get('count_bias_pooled'), 'signed')} |")
    return "\n".join(rows)


def _groups_section(groups: dict | None) -> str:
    """Figures per held-out group (validate_bundle.heldout_group_figures), modality by modality."""
    if not groups:
        return ""
    order = {key: k for k, key in enumerate(LABELS)}
    rows = ["| held-out group | modality | images | nuclei | AP50 pooled | recall | F1 | median count error | count bias |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, g in sorted(groups.items(), key=lambda item: (order.get(item[1]["modality"], len(order)), item[0])):
        rows.append(f"| `{name}` | {LABELS.get(g['modality'], g['modality'])} | {g['images']} | {g.get('nuclei', 'n/a')} | "
                    f"{_fmt(g['ap50_tp_fp_fn_pooled'])} | {_fmt(g.get('recall_pooled'))} | {_fmt(g['f1_pooled'])} | "
                    f"{_fmt(g['median_rel_count_error'], pct=True)} | {_fmt(g.get('count_bias_pooled'), 'signed')} |")
    table = "\n".join(rows)
    return f"""
### By held-out group

Each held-out group is one whole acquisition (DSB2018: images of one size, channel count and look), patient (TNBC),
preparation (Kromp) or organ (NuInsSeg), at the thresholds above. A new lab's images are most like one group, not
like the pool, so the spread between groups is what a lab may see; a group of one or two images moves by single
nuclei.

{table}
"""


def _recipe(t: dict) -> str:
    if t.get("soup"):
        parts = ", ".join(f"{i['bundle']} ({str(i['sha256'])[:12]})" for i in t["soup"])
        return f"weights averaged (model soup) of {len(t['soup'])} bundles with equal weights: {parts}; no training."
    if t.get("interpolation"):
        w = t["interpolation"]
        return (f"weights interpolated (WiSE-FT): {1 - w['alpha']:g} x bundle {w['start']} "
                f"({str(w['start_sha256'])[:12]}) + {w['alpha']:g} x bundle {w['tuned']} "
                f"({str(w['tuned_sha256'])[:12]}); no training; alpha chosen on the held-out groups.")
    aug = t.get("augmentation") or ("scale jitter (0.75-1.33), flips, 90° rotations, gamma, intensity and per-channel "
                                    "colour jitter")
    mix = f" Images drawn by modality: {t['mix']}." if t.get("mix") else (
        f" Stained images drawn with probability {t['stained_share']}." if t.get("stained_share") else "")
    average = (f" The weights are the moving average of the training's (decay {t['weight_average_decay']:g} a step), "
               f"not its last step's." if t.get("weight_average_decay") else "")
    return (f"{t.get('init', 'random initialisation')}; random {t.get('crop_px')}² crops with {aug}; AdamW, lr "
            f"{t.get('lr')}, warm-up then cosine decay; batch {t.get('batch_size')}; {t.get('steps')} steps in "
            f"{t.get('wall_seconds', 0) / 60:.0f} min on {t.get('hardware')} ({t.get('device')}).{mix}{average}")


def _masks_measured_at(m: dict, bundle) -> str:
    """The mask thresholds a validation's figures were measured at (its settings), and whether a count of the bundle
    as it is now uses others."""
    measured = m.get("settings", {}).get("mask_threshold")
    if measured is None:
        return ""
    per_modality = measured if isinstance(measured, dict) else {k: measured for k in PROTOCOL_MODALITIES}
    text = ", ".join(f"{float(v):.2f} for {k}" for k, v in sorted(per_modality.items()))
    now = {k: bundle.mask_threshold_for(k) for k in per_modality}
    stale = any(abs(float(v) - now[k]) > 1e-9 for k, v in per_modality.items())
    return f" Masks at probability >= {text}" + (
        f": not the bundle's now ({', '.join(f'{v:.2f} for {k}' for k, v in sorted(now.items()))}); these figures are "
        f"from before they changed (`validate_bundle --tta --write-card` measures them again)." if stale else ".")


def _chosen_by(m: dict) -> str:
    """What a score threshold was tuned on, as validate_bundle's --threshold-by chose (metrics' settings)."""
    if m.get("settings", {}).get("threshold_by") == "modality":
        return "mean of a threshold key's dataset modalities' pooled F1 (each alike, as the ship rule weighs them)"
    return "pooled F1"


def _tta_section(m: dict | None, thresholds: dict, bundle) -> str:
    if not m:
        return ""
    chosen = ", ".join(f"{k} {v:.2f}" for k, v in sorted(thresholds.items()))
    return f"""
## With test-time augmentation (`cellseg count --tta`)

The 8 flips and 90° rotations of every tile, their cells merged (a cell's score is its summed score over the views
divided by 8), on the same held-out images; score thresholds chosen the same way for the merged scores: {chosen}.{_masks_measured_at(m, bundle)}

{figures_table(m)}
"""


CURVE_COLUMNS = MODALITIES + ("all", "median_count_error_all")     # heldout.csv's, as plot_heldout reads them


def run_in_checkout(run: Path) -> str:
    """`run`'s path from the root of the git checkout holding it (the first folder above it with a .git), or as
    given when no checkout holds it."""
    absolute = run.resolve()
    for folder in absolute.parents:
        if (folder / ".git").exists():
            return absolute.relative_to(folder).as_posix()
    return str(run)


def curve_table(rows: list[dict], run) -> dict:
    """The card's [heldout_curve] (model.toml): a long run's held-out rows (plot_heldout.read_curve) as one array
    per column; a column some snapshot lacks is left out (TOML has no null). The run is named by its path within
    the checkout it lies in (runs/NAME), not by where that checkout was on the machine that wrote the card."""
    table = {"run": run_in_checkout(Path(run)), "steps": [r["step"] for r in rows]}
    table.update({c: [r[c] for r in rows] for c in CURVE_COLUMNS if all(r.get(c) is not None for r in rows)})
    return table


def _curve_section(curve: dict | None) -> str:
    if not curve:
        return ""
    columns = [c for c in CURVE_COLUMNS if c in curve]
    header = ["step"] + [LABELS.get(c, "median count error, all") for c in columns]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, step in enumerate(curve["steps"]):
        rows.append(f"| {step:,} | " + " | ".join(_fmt(curve[c][k], pct=c.startswith("median")) for c in columns)
                    + " |")
    table = "\n".join(rows)
    gaps = {b - a for a, b in zip(curve["steps"], curve["steps"][1:])}
    when = f"every {gaps.pop():,} steps" if len(gaps) == 1 else "at each step of the table"   # the run's --snapshot-every
    return f"""
## Held-out AP50 against training steps

The long run this bundle's last training stage comes from (`{curve['run']}`): {when} a snapshot scored
through the `cellseg count` pipeline on a fixed subset of the held-out groups (the same first images of each modality),
AP50 pooled, thresholds tuned per snapshot; a smaller set than the figures above, so its values differ from theirs.

![held-out AP50 per modality against training steps](heldout_curve.png)

{table}
"""


def _calibration_section(bundle) -> str:
    """The card's calibration section (references/nuclei/calibrate_bundle.py): p_nucleus's calibration error and the
    count interval's coverage per held-out modality, cross-validated by group, and the reliability diagram."""
    calibration = bundle.calibration
    if calibration is None:
        return f"""
## Calibrated scores and the count's interval

{bundle.calibration_note}: counts with these weights give no p_nucleus and no estimated true count (run
`python -m references.nuclei.calibrate_bundle` after validate_bundle to fit them).
"""
    report = calibration.report
    rows = ["| modality | images (groups) | ECE of p_nucleus | ECE at IoU 0.5 | 90 % interval: coverage (without the "
            "widening) | median relative width | median error: estimate / count | groups covered as slides |",
            "|---|---|---|---|---|---|---|---|"]
    left_out = []
    for key, table in sorted(report.get("keys", {}).items()):
        if "left_out" in table:
            left_out.append(f"{key}: {table['left_out']}")
            continue
        for m, f in sorted(table.get("by_modality", {}).items()):
            rows.append(f"| {LABELS.get(m, m)} ({key}, threshold {table['threshold']:.2f}) | {f['images']} "
                        f"({f['groups']}) | {_fmt(f['ece'])} | {_fmt(f.get('ece_iou_0.5'))} | "
                        f"{_fmt(f['coverage'], pct=True)} ({_fmt(f.get('coverage_without_widening'), pct=True)}) | "
                        f"{_fmt(f['median_relative_width'], pct=True)} | "
                        f"{_fmt(f['median_rel_error_estimate'], pct=True)} / {_fmt(f['median_rel_error_count'], pct=True)} "
                        f"| {f.get('groups_covered', 'n/a')} of {f['groups']} |")
    spreads = ", ".join(f"{k}: sigma² {v.spread.sigma2:.4f}, tau² {v.spread.tau2:.3f}, z {v.spread.z_low:.2f} to "
                        f"{v.spread.z_high:.2f}" for k, v in sorted(calibration.keys.items()))
    missing = ("\n\nNot calibrated: " + "; ".join(left_out) + ". Slides of that kind are counted without p_nucleus "
               "or an estimated true count.") if left_out else ""
    missing += _appearance_paragraph(report.get("appearance") or {})
    return f"""
## Calibrated scores and the count's interval

`cells.csv`'s `p_nucleus` is the probability that a detection is an annotated nucleus (overlapping one at IoU >=
{report.get('match_iou', 0.3)}, highest scores first): an isotonic map of the detection score per threshold key,
fitted on the held-out groups counted by the `cellseg count` pipeline, each held-out modality weighing the same.
`summary.json`'s `count_estimate` (and `regions.csv`) gives the count at the threshold, the expected true nuclei among
them (the sum of p_nucleus), the nuclei estimated missed (held-out recall at that threshold and nuclear area
fraction), the estimated true count and its 90 % interval: an estimate from validation data, not from the slide's
own annotations. Fitted on {report.get('fitted_on', 'the held-out images')}.

Checked by cross-validation by group: each group's images get p_nucleus and intervals from a fit on the other groups
only (the interval's spread itself from a cross-validation inside those). ECE: expected calibration error over the
detections kept at the threshold (10 bins). Coverage: the share of held-out images whose true count lies in their 90 %
interval; the interval takes the widest of the held-out modalities' quantiles (the figure without that widening in
brackets). Width: (high - low) / true count on these small images (tens to hundreds of nuclei); a slide's interval is
narrower, down to the spread between whole groups. Groups covered: each held-out group counted as one slide.

{chr(10).join(rows)}

Spread per key ({spreads}). The estimated true count is not a better point estimate than the count itself where a
modality's false detections and misses cancel (DSB2018 fluorescence, TNBC, stained tissue): its use is the interval,
which holds the true count where the count alone says nothing of its error.{missing}

![reliability of p_nucleus per held-out modality, out of fold](reliability.png)
"""


def _appearance_paragraph(appearance: dict) -> str:
    """The "unlike anything validated" check (appearance.json): each modality held out whole, the example slides."""
    if not appearance.get("keys"):
        return ""
    rows = ["| threshold key | modality held out whole | images | ROC AUC against the validated kinds | warned | "
            "validated images warned |", "|---|---|---|---|---|---|"]
    for key, table in sorted(appearance["keys"].items()):
        for m, f in sorted(table.get("held_out_whole", {}).items()):
            rows.append(f"| {key} | {LABELS.get(m, m)} | {f['images']} | {_fmt(f['roc_auc'])} | "
                        f"{_fmt(f['warned'], pct=True)} | {_fmt(f['others_warned'], pct=True)} |")
    examples = ", ".join(f"{name} {e['score']:.2f} (threshold {e['threshold']:.2f}: "
                         f"{'warns' if e['warns'] else 'no warning'})" for name, e in appearance.get("examples", {}).items())
    return f"""

A slide unlike anything validated is said to be (`appearance.json`, docs/uncertainty.md): its nucleus size,
brightness, texture and stain, the model's confidence and the nuclear area fraction, against the held-out images of its
kind (mean robust distance to the 3 nearest); the threshold lets 95 % of held-out images, each against the other
groups', through. A modality held out whole, scored against the others:

{chr(10).join(rows)}

The example slides: {examples or 'not checked'}."""


def _reproduce(stages: list[dict]) -> str:
    lines = [f"{k + 1}. `{s['reproduce']}`" for k, s in enumerate(stages) if s.get("reproduce")]
    return "\n".join(lines) or "see references/nuclei/train_default_bundle.py"


def _mask_text(bundle) -> str:
    """The mask thresholds a count uses: one, or per protocol modality (references/nuclei/mask_thresholds.py)."""
    if not bundle.mask_thresholds:
        return f"{bundle.mask_threshold:.2f}"
    choice = bundle.card.get("mask_threshold_choice", {})
    tried = sorted({t for rows in choice.values() if isinstance(rows, dict) for t in rows.get("mask_threshold", [])})
    how = (f" (chosen per protocol modality for the best {choice.get('criterion')} on these same images, among "
           f"{', '.join(f'{t:g}' for t in tried)})" if tried else "")
    modalities = sorted({*PROTOCOL_MODALITIES, *bundle.mask_thresholds})    # a protocol's, every one
    return ", ".join(f"{bundle.mask_threshold_for(m):.2f} for {m}" for m in modalities) + how


def _count_size_text(bundle, training: dict) -> str:
    """What the card says of `[scale] nucleus_diameter_px`: the training data's median nucleus, or, where a count size
    was set apart from it ([training] count_size says why), that."""
    why = training.get("count_size")
    if why:
        return f"Nuclei are brought to {bundle.nucleus_diameter_px:.1f} px in a count without a pixel size (count size: {why})."
    return f"Typical nucleus diameter in the training data: {bundle.nucleus_diameter_px:.1f} px."


def card_readme(bundle) -> str:
    c, m, t = bundle.card, bundle.card.get("metrics", {}), bundle.card.get("training", {})
    data = c.get("data", {})
    cfg = bundle.model
    stages = bundle.training_stages()[:-1]   # the stages before this bundle's own ([training])
    parts = [f"Stage {k + 1}" + (f" (bundle {s.get('bundle')}, sha256 {str(s.get('weights_sha256', ''))[:12]}…)"
                                 if k < len(stages) else " (this bundle)") + f": {_recipe(s)}"
             for k, s in enumerate(stages + [t])]
    thresholds = m.get("score_threshold_by_modality", {})
    threshold_text = ", ".join(f"{k} {v:.2f}" for k, v in sorted(thresholds.items())) or str(m.get("score_threshold"))
    datasets = data.get("datasets") or [DSB_CREDIT]
    return f"""# {bundle.name}: cellseg's nucleus model

Mask R-CNN ({cfg.backbone}-FPN, {cfg.norm}, {cfg.fpn_channels} FPN channels), anchors {cfg.anchor_sizes[0]}-{cfg.anchor_sizes[-1]} px,
tiles run at their own scale (no resize), up to {cfg.detections_per_tile} cells per tile, masks kept at box size.
Trained from random initialisation: no ImageNet or COCO weights were used or downloaded.
Weights: `weights.safetensors` (float16, sha256 `{bundle.weights_sha256[:16]}…`), loaded without unpickling.

## Data

{chr(10).join('- ' + d for d in datasets)}

Training images: {data.get('train_images', '?')}; held out: {data.get('val_images', '?')}. {data.get('split', '')}
{_count_size_text(bundle, t)}

## Recipe

{chr(10).join(parts)}

Reproduce, stage by stage:

{_reproduce(stages + [t])}

## Validation on held-out acquisition groups and patients (IoU 0.5)

Images of experiments (DSB2018 acquisition groups) and patients (TNBC) held out from training (which of them an
earlier training stage saw, if any, is said below the table and in the "images no training stage saw" rows), each
through the full `cellseg count` pipeline (512 px tiles, 64 px halo), masks at probability >= {_mask_text(bundle)}. AP50 is TP/(TP+FP+FN) (the DSB2018 /
StarDist definition), pooled over all cells and as the mean over images; the DSB2018 score is, per image, the mean
of TP/(TP+FP+FN) over IoU 0.50:0.05:0.95; COCO AP is mask AP@[.5:.95] at maxDets >= 1000; count bias is the pooled
(predicted - true) / true. Score thresholds, chosen per protocol modality for the best {_chosen_by(m)} on these
same images (brightfield_gray: a count's threshold for a slide whose network input has no colour): {threshold_text}.

{figures_table(m)}
{_groups_section(m.get('by_group'))}
{c.get('validation_note', '')}
{_tta_section(c.get('metrics_tta'), bundle.tta_score_thresholds, bundle)}{_curve_section(c.get('heldout_curve'))}{_calibration_section(bundle)}
## Limitations

2D nuclei at the native pixel sizes of the training data (nuclei ~10-40 px across; the pipeline resamples to
{bundle.nucleus_diameter_px:.0f} px when a nucleus size or pixel size is known). Cytoplasm/whole-cell segmentation and 3D
stacks are out of scope. Some DSB2018 histology images are only partly annotated, which lowers the stained-tissue
figures.
"""

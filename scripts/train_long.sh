#!/usr/bin/env bash
# The long CPU training of the nuclei model: starts it, or resumes it from its last checkpoint, in the background at
# low priority (nice 10), so other work on the machine stays responsive. Run it first thing in every session.
#
#     bash scripts/train_long.sh            start or resume (RUN, default runs/long)
#     bash scripts/train_long.sh status     running or not, steps so far, held-out scores
#     bash scripts/train_long.sh stop       stop it (the checkpoint of the last <= 10 minutes is kept)
#     bash scripts/train_long.sh pause      freeze it (SIGSTOP), with a held-out scoring it has started: before timing
#     bash scripts/train_long.sh resume     let it go on (SIGCONT)                                        a benchmark
#
# Checkpoints every 10 minutes (RUN/checkpoint.pt, git-ignored); every 5,000 steps a snapshot is scored on a fixed
# subset of the held-out groups through the real pipeline (RUN/heldout.csv), kept in RUN/scored, and the best copied to RUN/best;
# scorings run on RUN.code, the code as it was when the trainer started, so edits beside the run cannot fail one.
# A new run starts from INIT (default: the newest committed candidate bundle, references/nuclei/candidates/*, by its
# last commit; else the shipped bundle), with a candidate's run.settings (its run's LR, STEPS, AUGMENT and SPLIT) where
# the environment gives none: a machine replaced with runs/ gone loses no more than the uncommitted steps.
# STEPS (default 60000) is the total the cosine schedule spans, LR (default 5e-5) its peak, AUGMENT (default none)
# augmentation settings changed from the recipe's (e.g. invert_p=0.25), SPLIT (default references/nuclei/splits/v4.json:
# the v3 bundle's split with Kromp and NuInsSeg added) the images it trains on, BACKBONE (default: INIT's) a deeper backbone than INIT's (e.g. resnet34 from a
# ResNet-18 bundle: its new blocks start as the identity), ANCHORS (default: INIT's) the RPN's anchor ratios (e.g.
# 0.33,0.5,1,2,3: each new ratio starts as its nearest old one), MIX (default: the recipe's) the draw shares by modality
# (e.g. fluorescence=0.4,stained_tissue=0.35,he_nuinsseg=0: --mix), AVERAGE (default none) the decay of the moving average
# of the weights its bundles get (e.g. 0.999: --weight-average), BODY_LR (default 1) the ResNet body's share of the
# rate (e.g. 0.1: --backbone-lr-scale), KEEP_INIT_SETTINGS (default none; 1: --keep-init-settings) its bundles keep
# INIT's thresholds and count size, so that snapshots are scored as they would ship, SNAPSHOT_EVERY (default 5000)
# the steps between scored snapshots; a new run writes the eleven and INIT to RUN.settings and every resume
# (or restart of a run that stopped before its first checkpoint) reads them back, so the schedule, data and network
# stay the ones the run started with.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/long}
PYTHON=${PYTHON:-python3}
pid_file="$RUN.pid"
running() { [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }
# The trainer and the validate_bundle child it starts for a snapshot's scoring: signalling the trainer alone
# would leave a scoring running, and a benchmark timed beside it.
signal_tree() {    # SIGNAL PID...: each PID and, depth first, its children
    local signal=$1 pid; shift
    for pid in "$@"; do kill "-$signal" "$pid" 2>/dev/null || true; signal_tree "$signal" $(pgrep -P "$pid" || true); done
}
# The settings a run keeps in RUN.settings besides LR, STEPS and INIT (one list, so a new one is added in one place);
# a settings file from before one of them was kept means none / the default for it, whatever the environment says.
KEPT="AUGMENT SPLIT BACKBONE ANCHORS MIX AVERAGE BODY_LR KEEP_INIT_SETTINGS"
clear_kept() { local key; for key in $KEPT; do printf -v "$key" '%s' ""; done; }
described() {    # the run's settings, for its log line
    local key text="LR=${LR:-} STEPS=${STEPS:-}"
    for key in $KEPT; do text="$text $key=${!key:-}"; done
    echo "$text SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-5000}" | sed 's/SPLIT= /SPLIT=default /'
}
case "${1:-start}" in
status)
    if running; then echo "running (pid $(cat "$pid_file"))"; else echo "not running"; fi
    [ -f "$RUN.log" ] && tr '\r' '\n' < "$RUN.log" | grep -E '^train:' | tail -1
    [ -f "$RUN/heldout.csv" ] && column -s, -t < "$RUN/heldout.csv"
    exit 0 ;;
stop)
    # SIGTERM, not SIGINT: a background job ignores Ctrl-C; the loop finishes its step and saves first.
    running && kill -TERM "$(cat "$pid_file")" && echo "asked pid $(cat "$pid_file") to stop (it saves first)"
    exit 0 ;;
pause|resume)
    running || { echo "not running"; exit 0; }
    signal_tree "$([ "$1" = pause ] && echo STOP || echo CONT)" "$(cat "$pid_file")"
    echo "${1}d pid $(cat "$pid_file") and its children"
    exit 0 ;;
start) ;;
*) echo "train_long.sh: expected start, status, stop, pause or resume, found $1" >&2; exit 2 ;;
esac
if running; then echo "already running (pid $(cat "$pid_file")): bash $0 status"; exit 0; fi
mkdir -p "$(dirname "$RUN")"
settings_file="$RUN.settings"    # the schedule a run started with: a resume must not change its peak or length
if [ -f "$RUN/checkpoint.pt" ]; then
    # a resume trains on the run's own split.json, written when it started: the shipped bundle's split may have
    # changed since (a new bundle ships its own), and the held-out curve must stay one measurement
    args=(--resume)
    if [ -f "$settings_file" ]; then
        clear_kept
        # shellcheck disable=SC1090
        source "$settings_file"
        # SNAPSHOT_EVERY is not reset: a settings file from before it was kept takes the environment's
        echo "resuming $RUN from its checkpoint (its schedule: $(described), from $settings_file)"
    else
        echo "resuming $RUN from its checkpoint"
    fi
elif [ -f "$settings_file" ] && [ -d "$RUN" ] && [ -n "$(ls -A "$RUN")" ]; then
    # a run stopped before its first checkpoint: it starts again as it was started (its INIT and schedule, not the
    # environment's or a newer candidate's); what it left (a step-0 snapshot and its scoring) is set aside
    INIT=; clear_kept
    # shellcheck disable=SC1090
    source "$settings_file"
    INIT=${INIT:-cellseg/models/nuclei}
    [ -d "$INIT" ] || { echo "train_long.sh: expected INIT to be a bundle folder, found no $INIT" >&2; exit 2; }
    rm -rf "$RUN.before-checkpoint" && mv "$RUN" "$RUN.before-checkpoint"
    args=(--init "$INIT" --split "${SPLIT:-references/nuclei/splits/v4.json}")
    echo "restarting $RUN, which stopped before its first checkpoint, from $INIT ($(described), from" \
         "$settings_file; what it left is in $RUN.before-checkpoint)"
else
    if [ -z "${INIT:-}" ]; then
        INIT=cellseg/models/nuclei
        newest=0
        for candidate in references/nuclei/candidates/*/; do
            [ -f "$candidate/model.toml" ] || continue
            when=$(git log -1 --format=%ct -- "$candidate" 2>/dev/null || echo 0)
            if [ "${when:-0}" -gt "$newest" ]; then newest=$when; INIT=${candidate%/}; fi
        done
    fi
    [ -d "$INIT" ] || { echo "train_long.sh: expected INIT to be a bundle folder, found no $INIT" >&2; exit 2; }
    if [ -f "$INIT/run.settings" ]; then
        # a candidate kept from a long run (make_candidate): the branch goes on with its learning rate, length,
        # augmentation and split, unless the environment gives them
        while IFS='=' read -r key value; do
            case "$key" in LR|STEPS|AUGMENT|SPLIT|MIX|AVERAGE|BODY_LR) [ -n "${!key:-}" ] || printf -v "$key" '%s' "$value" ;; esac
        done < "$INIT/run.settings"
        echo "taking up $INIT's run settings ($(described))"
    fi
    args=(--init "$INIT" --split "${SPLIT:-references/nuclei/splits/v4.json}")
    LR=${LR:-5e-5}; STEPS=${STEPS:-60000}; SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-5000}
    {
        printf 'LR=%s\nSTEPS=%s\n' "$LR" "$STEPS"
        for key in $KEPT; do printf '%s=%s\n' "$key" "${!key:-}"; done
        printf 'SNAPSHOT_EVERY=%s\nINIT=%s\n' "$SNAPSHOT_EVERY" "$INIT"
    } > "$settings_file"
    echo "starting $RUN from $INIT ($(described), kept in $settings_file for its resumes)"
fi
nohup nice -n 10 "$PYTHON" -m references.nuclei.train_default_bundle --out "$RUN" \
    --lr "${LR:-5e-5}" --warmup 200 --steps "${STEPS:-60000}" --threads "${THREADS:-2}" --checkpoint-minutes 10 \
    --snapshot-every "${SNAPSHOT_EVERY:-5000}" --heldout-per-modality "${HELDOUT_PER_MODALITY:-24}" \
    ${AUGMENT:+--augment "$AUGMENT"} ${BACKBONE:+--backbone "$BACKBONE"} ${ANCHORS:+--aspect-ratios "$ANCHORS"} \
    ${MIX:+--mix "$MIX"} ${AVERAGE:+--weight-average "$AVERAGE"} ${BODY_LR:+--backbone-lr-scale "$BODY_LR"} \
    ${KEEP_INIT_SETTINGS:+--keep-init-settings} \
    "${args[@]}" \
    >> "$RUN.log" 2>&1 &
echo $! > "$pid_file"
echo "pid $! (log $RUN.log)"

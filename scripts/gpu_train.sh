#!/usr/bin/env bash
# One call of the nuclei recipe on a lent GPU machine (docs/gpu.md): from the repository root, with one part of the
# training data (.carry/train_partN) and .carry/wheels_train carried (scripts/gpu_prepare.sh makes them):
#
#     bash scripts/gpu_train.sh
#
# Each call first adds the carried parts to runs/gpu_data (kept on the machine while it is held); until every part
# has arrived it stops there ("staged"), so the first calls only bring data. (A pack small enough to travel whole as
# .carry/train_data is used as it is.) The first training call starts in runs/gpu from GPU_INIT (default the shipped
# bundle, deepened to GPU_BACKBONE, default resnet34: its new blocks start as the identity; GPU_INIT=none: from
# scratch); a run from a bundle keeps that bundle's thresholds and count size (--keep-init-settings), so the bundle it
# brings back is scored as it would ship; every later call while the machine is held resumes it from runs/gpu/checkpoint.pt. Each call trains GPU_MINUTES (default 8.5, inside the 10-minute
# limit of a call) and checkpoints every 3 minutes; the learning-rate schedule spans GPU_SCHEDULE_MINUTES of
# training over all calls (default 24: three calls). GPU_MIX: the draw shares by modality (train_default_bundle --mix;
# default the recipe's); GPU_BODY_LR: the ResNet body's share of the rate (--backbone-lr-scale; default 1);
# GPU_AUGMENT: augmentation settings beside the recipe's (--augment, e.g. paste_p=0.5,paste_touch_p=0.8). At the end
# of each call the bundle as it stands goes to $OUT with its weights in parts of at most 15 MiB (results come back in
# files of at most 16 MiB); scripts/gpu_collect.sh puts them together here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out}
RUN=${GPU_RUN:-runs/gpu}
DEVICE=${GPU_DEVICE:-cuda}
mkdir -p "$OUT"
if ls .carry/wheels_train/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cellseg-site .carry/wheels_train/*.whl
    export PYTHONPATH=/tmp/cellseg-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DATA=.carry/train_data
if ls -d .carry/train_part* >/dev/null 2>&1; then
    DATA=runs/gpu_data
    mkdir -p "$DATA"
    for part in .carry/train_part*; do cp -r "$part"/. "$DATA"/; done
    if ! python3 -m references.nuclei.pack_training_data --check "$DATA"; then
        echo "staged: the next call carries the next part (.carry/train_partN)"
        exit 0
    fi
fi
RESUME=""
# the bundles get the moving average of the weights (docs/training.md: on the CPU it kept stained tissue that the last
# step's weights lost); GPU_AVERAGE= (empty) writes the last step's
AVERAGE=${GPU_AVERAGE-0.999}
INIT=(--init "${GPU_INIT:-cellseg/models/nuclei}" --keep-init-settings)
[ "${GPU_INIT:-}" = none ] && INIT=()
[ -f "$RUN/checkpoint.pt" ] && RESUME="--resume" && INIT=()
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m references.nuclei.train_default_bundle --out "$RUN" --data-root "$DATA" \
    --split "$DATA/split.json" --device "$DEVICE" --backbone "${GPU_BACKBONE:-resnet34}" "${INIT[@]}" \
    --batch-size "${GPU_BATCH:-16}" --crop "${GPU_CROP:-512}" --lr "${GPU_LR:-2e-4}" --warmup 300 \
    --workers "${GPU_WORKERS:-12}" --steps 1000000 --minutes "${GPU_MINUTES:-8.5}" \
    --schedule-minutes "${GPU_SCHEDULE_MINUTES:-24}" --checkpoint-minutes 3 \
    ${AVERAGE:+--weight-average "$AVERAGE"} ${GPU_MIX:+--mix "$GPU_MIX"} \
    ${GPU_BODY_LR:+--backbone-lr-scale "$GPU_BODY_LR"} ${GPU_AUGMENT:+--augment "$GPU_AUGMENT"} $RESUME 2>&1 | tr '\r' '\n' | \
    grep -v '^train: ' | tee "$OUT/train.log"
# The bundle as it stands, for scripts/gpu_collect.sh: weights in parts, model card, log, split.
split -b 15M -d -a 1 "$RUN/weights.safetensors" "$OUT/weights.safetensors.part"
cp "$RUN/model.toml" "$RUN/training_log.csv" "$OUT/"
python3 - "$RUN" <<'PY'
import sys, tomllib
t = tomllib.load(open(f"{sys.argv[1]}/model.toml", "rb"))["training"]
print(f"after this call: {t['steps']} steps, {t['wall_seconds'] / 60:.1f} min of training on {t['hardware']}")
PY

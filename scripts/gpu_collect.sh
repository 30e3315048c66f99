#!/usr/bin/env bash
# Put a bundle that came back from scripts/gpu_train.sh together here (docs/gpu.md):
#     bash scripts/gpu_collect.sh FILES_AT BUNDLE_DIR [SPLIT_JSON]
# FILES_AT: the folder the device tool copied $OUT to. The weights' sha256 in model.toml is checked on load.
set -euo pipefail
from=$1
to=$2
split_json=${3:-.carry/train_data/split.json}
[ -e "$to" ] && { echo "gpu_collect: error: expected a new folder for the bundle, found $to" >&2; exit 1; }
mkdir -p "$to"
cat "$from"/weights.safetensors.part* > "$to/weights.safetensors"
cp "$from/model.toml" "$to/"
cp "$from/training_log.csv" "$to/" 2>/dev/null || true
cp "$split_json" "$to/split.json"
python3 -c "import sys; from cellseg.bundles.bundle import load_bundle; from cellseg.detection.network import load_network; \
b = load_bundle(sys.argv[1]); load_network(b); \
print(f'{sys.argv[1]}: {b.model.backbone}, {b.card[\"training\"][\"steps\"]} steps, sha256 ok')" "$to"

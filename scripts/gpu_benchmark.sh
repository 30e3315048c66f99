#!/usr/bin/env bash
# GPU throughput of `cellseg count` on a lent machine (docs/gpu.md), with .carry/wheels_bench carried:
#     bash scripts/gpu_benchmark.sh [BUNDLE]
# 1. benchmarks/run.py on the example mosaic (cellseg against the naive torchvision loop, 3 rounds);
# 2. a BENCH_SIZE x BENCH_SIZE dense slide built there (benchmarks/make_big_slide.py, default 20480: > 300 MP of
#    tissue), one round: cellseg's MP/s of tissue, stage split and peak GPU memory against the naive loop.
# Each run's GPU utilisation and memory are sampled every 250 ms (benchmarks/gpu_sampler.py: util_*.json). Every
# figure lands in $OUT as it is made, the mosaic's first, so what finished comes back even when the 10-minute call
# ends the big slide early (BENCH_BIG_SECONDS caps it: default 420 s).
# A dry run on a CPU, to check the script before a lease: BENCH_DEVICE=cpu BENCH_SIZE=2048 OUT=/tmp/gb bash ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out}
DEVICE=${BENCH_DEVICE:-cuda}
SIZE=${BENCH_SIZE:-20480}
mkdir -p "$OUT"
source scripts/bench_env.sh
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu_name.txt"
fi
python3 -c "import os, torch; print('torch', torch.__version__, 'cores', os.cpu_count())" | tee "$OUT/host.txt"
python3 benchmarks/gpu_sampler.py --csv "$OUT/util_mosaic.csv" --json "$OUT/util_mosaic.json" -- \
    python3 benchmarks/run.py --slide example_slides/fluo_mosaic.ome.tif --device "$DEVICE" ${1:+--model "$1"} \
    --json "$OUT/gpu_mosaic.json" 2>&1 | tee "$OUT/gpu_mosaic.log"
python3 benchmarks/make_big_slide.py --size "$SIZE" --out /tmp/big.ome.tif --labels
timeout "${BENCH_BIG_SECONDS:-420}" \
    python3 benchmarks/gpu_sampler.py --csv "$OUT/util_big.csv" --json "$OUT/util_big.json" -- \
    python3 benchmarks/run.py --slide /tmp/big.ome.tif --device "$DEVICE" --rounds 1 ${1:+--model "$1"} \
    --json "$OUT/gpu_big.json" 2>&1 | tee "$OUT/gpu_big.log"

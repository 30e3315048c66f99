#!/usr/bin/env bash
# GPU throughput of `cellseg count` on a lent machine (docs/gpu.md), with .carry/wheels_bench carried:
#     bash scripts/gpu_benchmark.sh [BUNDLE]
# Runs benchmarks/run.py --device cuda on the example mosaic, then builds a BENCH_SIZE x BENCH_SIZE dense slide there
# (benchmarks/make_big_slide.py; default 10240: on an H100 cellseg analysed ~3 tiles/s of the mosaic, so a 20480²
# slide's 1600 tiles plus the naive loop outlast a 10-minute call) and runs it on that (cellseg's stage split, MP/s of
# tissue, peak GPU memory, against the naive torchvision loop), leaving the JSON figures in $OUT. The mosaic goes
# first: its figures come back even when the big slide runs out of time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cellseg-site .carry/wheels_bench/*.whl
export PYTHONPATH=$PWD:/tmp/cellseg-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SIZE=${BENCH_SIZE:-10240}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/run.py --slide example_slides/fluo_mosaic.ome.tif --device cuda ${1:+--model "$1"} \
    --json "$OUT/gpu_mosaic.json" 2>&1 | tee "$OUT/gpu_mosaic.log"
python3 benchmarks/make_big_slide.py --size "$SIZE" --out /tmp/big.ome.tif --labels
python3 benchmarks/run.py --slide /tmp/big.ome.tif --device cuda ${1:+--model "$1"} --json "$OUT/gpu_big.json" \
    2>&1 | tee "$OUT/gpu_big.log"

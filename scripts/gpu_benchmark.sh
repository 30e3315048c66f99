#!/usr/bin/env bash
# GPU throughput of `cellseg count` on a lent machine (docs/gpu.md), with .carry/wheels_bench carried:
#     bash scripts/gpu_benchmark.sh [BUNDLE]
# Builds a 20480 x 20480 dense slide there (benchmarks/make_big_slide.py), runs benchmarks/run.py --device cuda on it
# (cellseg's stage split, MP/s of tissue, peak GPU memory, against the naive torchvision loop on a corner of it),
# and leaves the JSON figures in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cellseg-site .carry/wheels_bench/*.whl
export PYTHONPATH=$PWD:/tmp/cellseg-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SIZE=${BENCH_SIZE:-20480}
python3 benchmarks/make_big_slide.py --size "$SIZE" --out /tmp/big.ome.tif --labels
python3 benchmarks/run.py --slide /tmp/big.ome.tif --device cuda ${1:+--model "$1"} --json "$OUT/gpu_big.json" \
    2>&1 | tee "$OUT/gpu_big.log"
python3 benchmarks/run.py --slide example_slides/fluo_mosaic.ome.tif --device cuda ${1:+--model "$1"} \
    --json "$OUT/gpu_mosaic.json" 2>&1 | tee "$OUT/gpu_mosaic.log"

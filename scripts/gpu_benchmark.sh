#!/usr/bin/env bash
# GPU throughput of `cellseg count` on a lent machine (docs/gpu.md), with .carry/wheels_bench carried:
#     bash scripts/gpu_benchmark.sh [BUNDLE]
# 0. benchmarks/detect_profile.py: where the detection thread's time goes a tile (host parts, GPU kernels, launches,
#    synchronisations) on BENCH_PROFILE_TILES dense tiles (default 96; 0 skips it), ~30 s;
# 1. benchmarks/run.py on the example mosaic (cellseg against the naive torchvision loop, BENCH_MOSAIC_ROUNDS rounds,
#    default 3; 0 skips it: ~45 s a round on an H100 machine);
# 2. a BENCH_SIZE x BENCH_SIZE dense slide built there (benchmarks/make_big_slide.py, default 20480: > 300 MP of
#    tissue), one round: cellseg's MP/s of tissue, stage split and peak GPU memory against the naive loop; the
#    variants BENCH_BIG_VARIANTS (run.py --precisions; default auto:switch5,auto: the count at CPython's 5 ms switch
#    interval, then at cellseg's 0.5 ms, util.threads.quick_handoff). On a CPU dry run: BENCH_BIG_VARIANTS=bf16
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
# The bundle must be whole here: `gpu_travel_light.sh on --without-shipped` leaves the shipped weights behind, and a
# count without them fails after the machine's minutes are spent (2026-11-28): name the carried one (runs/gpu_init)
bundle=${1:-cellseg/models/nuclei}
[ -f "$bundle/weights.safetensors" ] || { echo "gpu_benchmark: expected a bundle with its weights at $bundle, found" \
    "none (the shipped weights stayed behind? pass the carried bundle: bash $0 runs/gpu_init)" >&2; exit 2; }
if [ "${BENCH_PROFILE_TILES:-96}" -gt 0 ]; then
    python3 benchmarks/detect_profile.py --device "$DEVICE" --tiles "${BENCH_PROFILE_TILES:-96}" --model "$bundle" \
        2>&1 | grep -v "^USDT\|^ERROR:.*gpuGetDeviceCount" | tee "$OUT/detect_profile.log" \
        || echo "gpu_benchmark: the profile failed (above); the benchmark goes on" >&2
fi
if [ "${BENCH_MOSAIC_ROUNDS:-3}" -gt 0 ]; then
    python3 benchmarks/gpu_sampler.py --csv "$OUT/util_mosaic.csv" --json "$OUT/util_mosaic.json" -- \
        python3 benchmarks/run.py --slide example_slides/fluo_mosaic.ome.tif --device "$DEVICE" --model "$bundle" \
        --rounds "${BENCH_MOSAIC_ROUNDS:-3}" --json "$OUT/gpu_mosaic.json" 2>&1 | tee "$OUT/gpu_mosaic.log"
fi
python3 benchmarks/make_big_slide.py --size "$SIZE" --out /tmp/big.ome.tif --labels
timeout "${BENCH_BIG_SECONDS:-420}" \
    python3 benchmarks/gpu_sampler.py --csv "$OUT/util_big.csv" --json "$OUT/util_big.json" -- \
    python3 benchmarks/run.py --slide /tmp/big.ome.tif --device "$DEVICE" --rounds 1 --model "$bundle" \
    --precisions "${BENCH_BIG_VARIANTS:-auto:switch5,auto}" --json "$OUT/gpu_big.json" 2>&1 | tee "$OUT/gpu_big.log"

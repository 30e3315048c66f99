#!/usr/bin/env bash
# The pipeline without the network (benchmarks/pipeline_ceiling.py) on an 8192² dense slide at 1, 2, 4, ... cores
# of this machine, each result-file layout the cores choose (one child process up to 3 cores, one per heavy output
# from 4), and at all cores with the single process too: does the host path grow with cores (issue 50)?
#     bash scripts/ceiling_cores.sh            (on a lent GPU machine: with .carry/wheels_bench carried)
# One JSON per run in $OUT (ceiling_<cores>_<layout>.json), and a line each on stdout as it finishes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/ceiling_out}
mkdir -p "$OUT"
source scripts/bench_env.sh
[ -f /tmp/big8k.ome.tif ] || python3 benchmarks/make_big_slide.py --size 8192 --out /tmp/big8k.ome.tif
all=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")
runs=""
for cores in 1 2 4 8 16 32 64; do
    [ "$cores" -lt "$all" ] && runs="$runs $cores:auto"
done
runs="$runs $all:auto $all:one"
for run in $runs; do
    cores=${run%%:*}
    layout=${run##*:}
    python3 benchmarks/pipeline_ceiling.py --slide /tmp/big8k.ome.tif --cpus "$cores" --writer-processes "$layout" \
        --json "$OUT/ceiling_${cores}_${layout}.json" | sed -n 2p | sed "s/^/$cores cores, $layout: /"
done

#!/usr/bin/env bash
# The pipeline without the network (benchmarks/pipeline_ceiling.py) on an 8192² dense slide at 1, 2, 4, ... cores
# of this machine, each result-file layout the cores choose (one child process up to 3 cores, one per heavy output
# from 4), and at all cores with the single process too: does the host path grow with cores (issue 50)? From 4 cores
# on, each count also runs with its tiles measured in the count's own thread (measure 0), against the measuring
# processes the cores choose (run/measuring.py; measure auto).
#     bash scripts/ceiling_cores.sh            (on a lent GPU machine: with .carry/wheels_bench carried)
# One JSON per run in $OUT (ceiling_<cores>_<layout>_<measure>.json), and a line each on stdout as it finishes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/ceiling_out}
mkdir -p "$OUT"
source scripts/bench_env.sh
[ -f /tmp/big8k.ome.tif ] || python3 benchmarks/make_big_slide.py --size 8192 --out /tmp/big8k.ome.tif
all=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")
runs=""
for cores in 1 2 4 8 16 32 64; do
    [ "$cores" -lt "$all" ] && runs="$runs $cores:auto:auto" && [ "$cores" -ge 4 ] && runs="$runs $cores:auto:0"
done
runs="$runs $all:auto:auto $all:one:auto"
[ "$all" -ge 4 ] && runs="$runs $all:auto:0"
for run in $runs; do
    IFS=: read -r cores layout measure <<< "$run"
    python3 benchmarks/pipeline_ceiling.py --slide /tmp/big8k.ome.tif --cpus "$cores" --writer-processes "$layout" \
        --measure-processes "$measure" --json "$OUT/ceiling_${cores}_${layout}_${measure}.json" | sed -n 2p \
        | sed "s/^/$cores cores, $layout, measure $measure: /"
done

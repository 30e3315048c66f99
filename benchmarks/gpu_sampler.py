"""GPU utilisation and memory sampled while a command runs (scripts/gpu_benchmark.sh; not a test).

    python benchmarks/gpu_sampler.py --csv OUT/util_big.csv --every-ms 250 -- python benchmarks/run.py ...

Starts `nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms N` beside the command,
stops it when the command ends, and prints (and with --json writes) the samples' summary: how many, the mean and
median utilisation in %, the share of samples with the GPU busy (utilisation > 0), and the peak memory used in MiB.
Without nvidia-smi (a CPU dry run) the command runs alone and the summary says so. Exits with the command's status.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path


def summarise(lines: list[str]) -> dict:
    """The summary of nvidia-smi's CSV lines ("utilisation, memory used"; a line it could not finish is skipped)."""
    util, memory = [], []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not all(p.replace(".", "", 1).isdigit() for p in parts):
            continue
        util.append(float(parts[0]))
        memory.append(float(parts[1]))
    if not util:
        return {"samples": 0}
    return {"samples": len(util), "mean_util_pct": round(statistics.fmean(util), 1),
            "median_util_pct": round(statistics.median(util), 1),
            "busy_share": round(sum(u > 0 for u in util) / len(util), 3), "peak_memory_mib": max(memory)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", type=Path, required=True, help="the raw samples")
    p.add_argument("--json", type=Path, default=None, help="the summary")
    p.add_argument("--every-ms", type=int, default=250)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("expected a command after --")
    smi = shutil.which("nvidia-smi")
    sampler = None
    with open(args.csv, "w", encoding="utf-8") as raw:
        if smi:
            sampler = subprocess.Popen([smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                        f"-lms={args.every_ms}"], stdout=raw, stderr=subprocess.DEVNULL)
        try:
            status = subprocess.call(command)
        finally:
            if sampler is not None:
                sampler.terminate()
                sampler.wait()
    summary = (summarise(args.csv.read_text(encoding="utf-8").splitlines()) if smi
               else {"samples": 0, "note": "no nvidia-smi here: nothing sampled"})
    summary["command"] = " ".join(command)
    print("gpu utilisation:", json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""What a thread that waits pays to get the interpreter lock back beside a busy Python thread (not a test).

A GPU count's detection thread waits on the device many times a tile (torchvision's per-image filtering and NMS,
the masks' copies to the host), leaving the interpreter lock while it waits; the main thread meanwhile merges and
measures in Python. When the wait ends, the detection thread gets the lock back only when the main thread is made
to drop it: CPython's switch interval, 5 ms by default. This times WAITS waits of WAIT_MS each (time.sleep, which
leaves the lock as a device synchronisation does), each followed by a little Python, alone and beside a thread
running Python with small numpy calls (the merge's kind of work), at several switch intervals:
util.threads.quick_handoff sets HANDOFF_SECONDS for the length of a count.

    python benchmarks/gil_handoff.py [--waits 200] [--wait-ms 0.5]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np


def waits(n: int, seconds: float) -> float:
    start = time.perf_counter()
    for _ in range(n):
        time.sleep(seconds)         # the lock left, as while the device finishes
        sum(range(200))             # then a little Python: the next launches
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--waits", type=int, default=200)
    p.add_argument("--wait-ms", type=float, default=0.5)
    p.add_argument("--intervals-ms", default="5,1,0.5,0.1")
    args = p.parse_args()
    from cellseg.detection import cpu_model
    from cellseg.util.threads import HANDOFF_SECONDS
    print(f"CPU {cpu_model()}, Python {sys.version.split()[0]}; {args.waits} waits of {args.wait_ms} ms; "
          f"cellseg's HANDOFF_SECONDS {HANDOFF_SECONDS * 1000:g} ms")
    before = sys.getswitchinterval()
    stop = threading.Event()

    def busy() -> None:
        a = np.arange(100)
        while not stop.is_set():
            for i in range(200):
                a[i % 100] += 1

    try:
        for interval_ms in (float(x) for x in args.intervals_ms.split(",")):
            sys.setswitchinterval(interval_ms / 1000)
            alone = waits(args.waits, args.wait_ms / 1000)
            stop.clear()
            thread = threading.Thread(target=busy)
            thread.start()
            time.sleep(0.05)
            beside = waits(args.waits, args.wait_ms / 1000)
            stop.set()
            thread.join()
            print(f"switch interval {interval_ms:4g} ms: alone {1000 * alone:6.0f} ms, beside a busy thread "
                  f"{1000 * beside:6.0f} ms ({beside / alone:4.1f}x; {1000 * (beside - alone) / args.waits:.2f} ms "
                  f"more a wait)")
    finally:
        sys.setswitchinterval(before)


if __name__ == "__main__":
    main()

"""Work in background threads through bounded queues: memory stays a few items per queue, an error in any thread
reaches the caller, and no thread runs on after the caller has stopped.

- `in_background`: one producer thread ahead of the caller (the pipeline's detection thread).
- `fan_out`: one producer (the caller) feeding several consumer threads (the label pyramid writers, one per file).
- `quick_handoff`: the interpreter lock handed back within a short interval while threads share it.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager

_POLL_S = 0.1     # how often a blocked put looks again whether it should still wait


def put_while(q: queue.Queue, item, keep_waiting: Callable[[], bool]) -> bool:
    """Put `item` on the bounded queue `q`, waiting for room as long as keep_waiting() holds. False: it stopped
    holding first and `item` was not put."""
    while keep_waiting():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def items_until(q: queue.Queue, end: object) -> Iterator:
    """The items taken from `q` until the marker `end`."""
    while (item := q.get()) is not end:
        yield item


@contextmanager
def in_background(items: Iterator, max_waiting: int, name: str) -> Iterator[Iterator]:
    """Run the iterator `items` in a thread of its own, at most `max_waiting` items ahead of the consumer.

    Yields an iterator over the same items in the same order. An exception in `items` is raised in the consumer;
    when the consumer stops early (an exception, or not reading to the end), the thread is told to stop and joined
    before this returns, so nothing runs on after the pipeline has failed.
    """
    waiting: queue.Queue = queue.Queue(maxsize=max_waiting)
    stop = threading.Event()
    done = object()

    def offer(entry) -> bool:
        return put_while(waiting, entry, lambda: not stop.is_set())

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as e:   # handed to the consumer, which raises it
            offer((done, e))
        finally:
            if isinstance(items, Generator):
                items.close()     # a generator's own cleanup (its reader threads) runs in this thread

    def consume() -> Iterator:
        while True:
            item, error = waiting.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        stop.set()
        worker.join()


def fan_out(items: Iterable, consumers: list[Callable[[Iterator], None]], names: list[str],
            max_waiting: int = 8) -> None:
    """Hand every item of `items` to each consumer, each running in a thread of its own on an iterator of them.

    Each consumer's queue holds at most `max_waiting` items. When a consumer fails, the others get no more items
    (their iterators end) and the first failure is raised here once every thread has ended.
    """
    end = object()
    queues = [queue.Queue(maxsize=max_waiting) for _ in consumers]
    failures: list[BaseException] = []

    def run(consume: Callable[[Iterator], None], q: queue.Queue) -> None:
        try:
            consume(items_until(q, end))
        except BaseException as e:   # re-raised in the caller's thread below
            failures.append(e)

    def put(q: queue.Queue, thread: threading.Thread, item) -> None:
        """Hand `item` to `thread`, unless it has ended, or a consumer failed and `item` is not the end marker
        (then only the end marker still goes out, so no consumer is left waiting)."""
        put_while(q, item, lambda: thread.is_alive() and (item is end or not failures))

    threads = [threading.Thread(target=run, args=(consume, q), name=name)
               for consume, q, name in zip(consumers, queues, names)]
    for t in threads:
        t.start()
    try:
        for item in items:
            for q, t in zip(queues, threads):
                put(q, t, item)
            if failures:
                break
    finally:
        for q, t in zip(queues, threads):
            put(q, t, end)
        for t in threads:
            t.join()
    if failures:
        raise failures[0]


# A thread that leaves the interpreter lock to wait (a GPU synchronisation, a decoder) and wants it back waits until
# the thread holding it is made to drop it: CPython's switch interval, 5 ms by default. The detection thread of a GPU
# count waits on the device several times a pass (NMS, selections, the masks' copies) while the main thread merges
# and measures in Python: up to 5 ms each, ~10x a 0.5-ms wait's own time
# (docs/performance.md, "The interpreter lock").
HANDOFF_SECONDS = 0.0005
_handoff_lock = threading.Lock()
_handoff_users = 0
_handoff_before = 0.0


@contextmanager
def quick_handoff(seconds: float | None = None) -> Iterator[None]:
    """Within it the switch interval is at most `seconds` (None: HANDOFF_SECONDS), process-wide: counts running
    side by side share it, and the interval before is restored when the last one ends."""
    global _handoff_users, _handoff_before
    with _handoff_lock:
        if _handoff_users == 0:
            _handoff_before = sys.getswitchinterval()
            sys.setswitchinterval(min(HANDOFF_SECONDS if seconds is None else seconds, _handoff_before))
        _handoff_users += 1
    try:
        yield
    finally:
        with _handoff_lock:
            _handoff_users -= 1
            if _handoff_users == 0:
                sys.setswitchinterval(_handoff_before)

"""Child interpreters that run one of cellseg's modules and talk to their parent through two pipes.

`python -m MODULE TO_CHILD FROM_CHILD` with the parent's import path, not multiprocessing's spawn: spawn runs the
parent's main script again in the child first, and a user's script that counts slides at its top level (no
`if __name__ == "__main__"`) would then count them again there, or fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing.connection import Connection


def import_path() -> tuple[str, ...]:
    """The import path a child is given: this process's (a checkout used without installing it included)."""
    return tuple(p for p in sys.path if p)


def started_child(module: str) -> tuple[subprocess.Popen, Connection, Connection]:
    """A new child interpreter running `python -m module TO_CHILD FROM_CHILD` (the pipes' file descriptors), and the
    pipe ends that talk to it (to it, from it). It reads the end of its pipe when this process closes it, or dies."""
    to_child, to_child_end = os.pipe()
    from_child_end, from_child = os.pipe()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(import_path())}
    process = subprocess.Popen([sys.executable, "-m", module, str(to_child), str(from_child)],
                               pass_fds=(to_child, from_child), env=env, stdin=subprocess.DEVNULL)
    os.close(to_child)
    os.close(from_child)
    return process, Connection(to_child_end, readable=False), Connection(from_child_end, writable=False)


def end_child(process: subprocess.Popen, send: Connection, reply: Connection, timeout: float = 10.0) -> None:
    """Let a child go: it reads the end of its pipe and leaves; killed if it has not within `timeout` seconds."""
    send.close()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    reply.close()


def child_pipes() -> tuple[Connection, Connection]:
    """In the child: the pipe ends from and to the parent (started_child's arguments)."""
    return Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)

"""Progress bars that suit where they are shown: a terminal, or the log file of a batch job.

tqdm redraws its bar up to ten times a second. On a terminal each redraw overwrites the last; in a file (a cluster
job's log, `cellseg count ... 2> log`) every one stays, joined by carriage returns: a whole-slide count left
megabytes of them. There one update every LOG_INTERVAL_S seconds still shows a job is alive and how far it is.
"""

from __future__ import annotations

import sys

TERMINAL_INTERVAL_S = 0.1      # tqdm's own default
LOG_INTERVAL_S = 30.0


def progress_interval(stream=None) -> float:
    """Seconds between a progress bar's redraws on `stream` (default: stderr, where tqdm draws)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return TERMINAL_INTERVAL_S if isatty is not None and isatty() else LOG_INTERVAL_S

"""Progress bars redraw rarely in a log file and often on a terminal (cellseg/util/progress.py)."""

from __future__ import annotations

import io

from cellseg.util import progress_interval
from cellseg.util.progress import LOG_INTERVAL_S, TERMINAL_INTERVAL_S

from .helpers import FAST, invoke


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_redraws_often_a_log_file_rarely():
    assert progress_interval(_Terminal()) == TERMINAL_INTERVAL_S
    assert progress_interval(io.StringIO()) == LOG_INTERVAL_S == 30.0
    assert progress_interval(object()) == LOG_INTERVAL_S      # a stream that cannot tell: treated as a file


def test_a_count_into_a_log_leaves_a_few_bar_updates_not_one_per_tile(tmp_path, fluo_png, tiny_bundle):
    """The fluorescence fixture in 64 px tiles (16 of them) with stderr a file: the bar is drawn when it starts and
    when it ends, not after every tile, and
    never as an empty bar before the slide's tiles are known."""
    result = invoke(["count", fluo_png, "-o", tmp_path / "out", "--model", str(tiny_bundle),
                     *[a for a in FAST if a != "-q"]])
    assert result.exit_code == 0, result.output
    draws = result.stderr.count("tile/s]") + result.stderr.count("s/tile]")
    assert 1 <= draws <= 4, result.stderr
    assert " 0tile [" not in result.stderr, result.stderr     # the bar starts with the slide's tiles, not at 0 of 0

"""A measuring process (run/measuring.py): `python -m cellseg.run.measure_process TO_CHILD FROM_CHILD`.

Messages from the parent, one at a time: ("ready",) -> ("ready", None) once its modules are imported; ("tile",
slide_key, nuclei, ids, box, mpp, channel_names, class_names) -> ("rows", the tile's cells.csv columns) or ("error",
the exception). The tile's pixels are read here from the slide (slide_key: open_slide's path, skip_unreadable, z,
series and t, then the file's size and time), which stays open for the next tiles. The process ends when its pipe
closes.
"""

from __future__ import annotations

import pickle
import sys

from ..cells import label_and_measure
from ..slides import open_slide
from ..util import child_pipes

_opened: dict[tuple, object] = {}     # the slide the last tile came from, kept open


def measured(slide_key: tuple, nuclei, ids, box, mpp, channel_names, class_names) -> dict:
    slide = _opened.get(slide_key)
    if slide is None:
        for other in _opened.values():
            other.close()
        _opened.clear()
        slide = _opened[slide_key] = open_slide(slide_key[0], skip_unreadable=slide_key[1], z=slide_key[2],
                                                      series=slide_key[3], t=slide_key[4])
    return label_and_measure(nuclei, ids, box, slide.read_region(box), mpp, channel_names, class_names)


def serve() -> None:
    receive, reply = child_pipes()
    while True:
        try:
            message = pickle.loads(receive.recv_bytes())
        except EOFError:        # the parent is done with this process, or has gone
            return
        try:
            answer = ("ready", None) if message[0] == "ready" else ("rows", measured(*message[1:]))
        except Exception as e:      # the parent raises it
            answer = ("error", e)
        try:
            payload = pickle.dumps(answer, protocol=5)
        except Exception:           # an exception that does not pickle: its text
            payload = pickle.dumps(("error", RuntimeError(repr(answer[1]))), protocol=5)
        reply.send_bytes(payload)


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle: it ends this process
    serve()
    sys.exit(0)

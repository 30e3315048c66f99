"""Forward passes side by side on a CPU (detection/streams.py): each stream on its own thread count, the caller's and
later threads' counts untouched, results in order, errors raised, and the same detections as one pass at a time."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from cellseg.detection import Detector, build_model
from cellseg.detection.streams import ForwardStreams, cpu_stream_count

from ..helpers import tiny_model_config


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _threads_in_a_new_thread() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_each_stream_runs_on_its_share_and_other_threads_keep_the_callers_count(two_threads):
    streams = ForwardStreams(2, 1)
    assert streams.map(lambda _: torch.get_num_threads(), range(6)) == [1] * 6
    assert torch.get_num_threads() == 2
    assert _threads_in_a_new_thread() == 2     # not the streams' 1


def test_streams_return_results_in_order_and_raise_errors():
    streams = ForwardStreams(2, 1)
    assert streams.map(lambda x: x * x, range(10)) == [x * x for x in range(10)]

    def fail_on_three(x):
        if x == 3:
            raise ValueError("three")
        return x
    with pytest.raises(ValueError, match="three"):
        streams.map(fail_on_three, range(6))
    with pytest.raises(ValueError, match="expected at least 1 stream"):
        ForwardStreams(0, 1)


def test_two_streams_where_two_threads_are_shared():
    assert [cpu_stream_count(n) for n in (1, 2, 16)] == [1, 2, 2]


def test_streams_give_the_same_detections_as_one_pass_at_a_time(two_threads):
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    alone = Detector(model, torch.device("cpu"), score_threshold=0.0, batch_size=4, cpu_streams=1)
    side_by_side = Detector(model, torch.device("cpu"), score_threshold=0.0, batch_size=4, cpu_streams=2)
    assert alone.streams is None and side_by_side.streams.streams == 2
    rng = np.random.default_rng(3)
    images = [rng.random((3, 96, 96), dtype=np.float32) for _ in range(5)] + [rng.random((3, 64, 80), dtype=np.float32)]
    a, b = alone.detect(images), side_by_side.detect(images)
    assert sum(len(d) for d in a) > 0
    for x, y in zip(a, b):
        assert np.array_equal(x.boxes, y.boxes) and np.allclose(x.scores, y.scores, atol=1e-5)
        assert all(np.array_equal(p, q) for p, q in zip(x.masks, y.masks))

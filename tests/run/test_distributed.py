"""Counting on Dask (run/distributed.py): the cells of one process whatever the band size, detection on the workers
that offer a GPU, the counter loaded once per worker, a killed worker costing time and not results, a bad slide
failing alone; `cellseg count --workers N` end to end.

The detector reads a ground-truth label image back (helpers.LabelReadingDetector, with neighbouring tiles seeing
each cell shifted differently, so seams need their dedupe), so the workers need no network; only the CLI test
loads the tiny bundle's Mask R-CNN in its workers.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import signal
from pathlib import Path

import distributed
import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.errors import SlideError
from cellseg.planning import Protocol, load_protocol
from cellseg.run import CounterSpec, count_on_dask

from ..helpers import (
    DATA,
    FAST,
    LabelCounterSpec,
    Tally,
    assert_same_result,
    assert_user_error,
    invoke,
    listing,
    random_cells,
)

PROTOCOL = Protocol(name="test", tile_size=48, halo_px=12, batch_size=3, min_area_px=1, tissue_method="none")


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, one thread each (started once for the module: ~3 s)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as local:
        yield local


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> tuple[list[Path], Path]:
    """Two slides of one label image (the detector reads it back): 230 x 260 px and a 150 x 200 px crop."""
    folder = tmp_path_factory.mktemp("slides")
    labels = random_cells(230, 260, max_diameter=12, n=700, seed=5)
    tifffile.imwrite(folder / "labels.tif", labels)
    paths = []
    for name, (h, w) in {"big": (230, 260), "crop": (150, 200)}.items():
        paths.append(folder / f"{name}.tif")
        tifffile.imwrite(paths[-1], ((labels[:h, :w] > 0) * 200 + 20).astype(np.uint8))
    return paths, folder / "labels.tif"


def one_process(spec, slide: Path, out: Path) -> Path:
    """The reference: counter.CellCounter.count in this process, no bands, no journal."""
    spec.load().count(slide, out)
    return out


@pytest.mark.slow
def test_a_distributed_count_equals_one_process_at_any_band_size(tmp_path, cluster, slides):
    paths, labels = slides
    loads = tmp_path / "loads.txt"
    spec = LabelCounterSpec(PROTOCOL, labels, loads=loads, shift_px=2)
    reference = [one_process(spec, p, tmp_path / "one" / p.stem) for p in paths]
    cells = [int(json_summary(r)["cell_count"]) for r in reference]
    assert min(cells) > 100
    for band_rows in (1, 2, 3):     # the big slide has 5 tile rows: 5, 3 and 2 bands
        loads.write_text("")
        jobs = [(p, tmp_path / f"dask{band_rows}" / p.stem) for p in paths]
        progress = Tally()
        outcomes = count_on_dask(spec, jobs, scheduler=cluster.scheduler_address, band_rows=band_rows,
                                 progress=progress)
        assert [o.error for o in outcomes] == [None, None]
        # One progress count for the job: every analysed tile of both slides, each once.
        assert progress.total == progress.done == sum(o.summary["tiles_total"] for o in outcomes)
        for (_, out), ref, outcome in zip(jobs, reference, outcomes):
            assert_same_result(ref, out)
            assert outcome.summary["cell_count"] == json_summary(ref)["cell_count"]
            record = json_summary(out, "run.json")["distributed"]
            assert record["band_rows"] == band_rows and record["workers"] == 2
            assert not list(out.parent.glob(".*.partial"))          # the journals went with the commit
        # Each worker loaded the counter once for this job (every worker ran tasks: 2 slides, >= 4 bands).
        pids = loads.read_text().split()
        assert len(pids) == len(set(pids)) <= 2


def json_summary(folder: Path, name: str = "summary.json") -> dict:
    import json
    return json.loads((folder / name).read_text())


@pytest.mark.slow
def test_detection_runs_where_the_gpu_resource_is_and_merging_anywhere(tmp_path, slides):
    """A cluster of a worker offering GPU=1 and one offering nothing: plan and band tasks (which load the
    counter) all run on the first; the result is still the one-process result."""
    paths, labels = slides
    loads = tmp_path / "loads.txt"
    spec = LabelCounterSpec(PROTOCOL, labels, loads=loads, seconds_per_tile=0.01)
    workers = {"gpu": {"cls": distributed.Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
               "cpu": {"cls": distributed.Nanny, "options": {"nthreads": 1}}}
    with distributed.SpecCluster(scheduler={"cls": distributed.Scheduler, "options": {"dashboard_address": ":0"}},
                                 workers=workers, silence_logs=logging.ERROR) as spec_cluster, \
            distributed.Client(spec_cluster, set_as_default=False) as client:
        client.wait_for_workers(2)
        names = {w["name"]: address for address, w in client.scheduler_info()["workers"].items()}
        pids = client.run(os.getpid)
        jobs = [(p, tmp_path / "out" / p.stem) for p in paths]
        outcomes = count_on_dask(spec, jobs, scheduler=spec_cluster.scheduler_address, band_rows=1)
    assert [o.error for o in outcomes] == [None, None]
    assert json_summary(jobs[0][1], "run.json")["distributed"]["gpu_resource"] is True
    assert loads.read_text().split() == [str(pids[names["gpu"]])]
    assert_same_result(one_process(spec, paths[0], tmp_path / "one"), jobs[0][1])


@pytest.mark.slow
def test_a_killed_worker_costs_time_not_results(tmp_path, cluster, slides):
    paths, labels = slides
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2, seconds_per_tile=0.05)
    reference = [one_process(spec, p, tmp_path / "one" / p.stem) for p in paths]
    with distributed.Client(cluster, set_as_default=False) as client:
        before = client.run(os.getpid)
    killed = []

    class KillAWorker:
        """Job progress that SIGKILLs a worker process once the first band is done (the others are running)."""

        def planned(self, tiles: int) -> None:
            pass

        def analysed(self, tiles: int) -> None:
            if not killed:
                pid = next(iter(before.values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    jobs = [(p, tmp_path / "dask" / p.stem) for p in paths]
    outcomes = count_on_dask(spec, jobs, scheduler=cluster.scheduler_address, band_rows=1, progress=KillAWorker())
    assert killed
    assert [o.error for o in outcomes] == [None, None]
    for (_, out), ref in zip(jobs, reference):
        assert_same_result(ref, out)
    with distributed.Client(cluster, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)                   # the nanny restarted the killed worker
        assert killed[0] not in client.run(os.getpid).values()


@pytest.mark.slow
def test_a_slide_failing_in_a_task_fails_alone(tmp_path, cluster, slides):
    """A slide whose pixel data is corrupt (it opens; its tiles do not decode) fails with its one-line error; the
    slides before and after it are counted, and nothing of the failed one is left behind."""
    paths, labels = slides
    corrupt = corrupt_tiff(tmp_path / "corrupt.tif")
    spec = LabelCounterSpec(PROTOCOL, labels)
    jobs = [(paths[0], tmp_path / "out" / "a"), (corrupt, tmp_path / "out" / "corrupt"),
            (paths[1], tmp_path / "out" / "b")]
    outcomes = count_on_dask(spec, jobs, scheduler=cluster.scheduler_address, band_rows=1)
    assert outcomes[0].error is None and outcomes[2].error is None
    assert isinstance(outcomes[1].error, SlideError)
    message = str(outcomes[1].error)
    assert "\n" not in message and "corrupt" in message and "corrupt.tif" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b"]


@pytest.mark.slow
def test_a_z_stack_counts_on_dask_as_in_one_process(tmp_path, cluster, slides):
    """Every task opens the stack at the same --z (plan, bands, the final step): the one-process result."""
    paths, labels = slides
    flat = tifffile.imread(paths[0])
    stack = tmp_path / "stack.ome.tif"
    tifffile.imwrite(stack, np.stack([flat // 4, flat, flat // 2]), metadata={"axes": "ZYX"})
    spec = LabelCounterSpec(PROTOCOL, labels, z="mean")
    reference = one_process(spec, stack, tmp_path / "one")
    (outcome,) = count_on_dask(spec, [(stack, tmp_path / "dask")], scheduler=cluster.scheduler_address, band_rows=2)
    assert outcome.error is None and outcome.summary["z"] == "mean"
    assert_same_result(reference, tmp_path / "dask")
    assert json_summary(tmp_path / "dask", "run.json")["fingerprint"]["options"]["z"] == "mean"


@pytest.mark.slow
def test_a_chosen_image_or_time_point_counts_on_dask_as_in_one_process(tmp_path, cluster, slides):
    """Every task opens the same --series and --t (plan, bands, the final step): the one-process result, not the
    first image's."""
    paths, labels = slides
    flat = tifffile.imread(paths[0])
    plate = tmp_path / "plate.ome.tif"
    with tifffile.TiffWriter(plate, ome=True) as tw:
        for k, image in enumerate((flat // 3, flat)):
            tw.write(image, metadata={"axes": "YX", "Name": f"pos{k}"})
    spec = LabelCounterSpec(PROTOCOL, labels, series=1)
    reference = one_process(spec, plate, tmp_path / "one")
    assert_same_result(one_process(LabelCounterSpec(PROTOCOL, labels), paths[0], tmp_path / "flat"), reference)
    movie = tmp_path / "movie.tif"
    tifffile.imwrite(movie, np.stack([flat // 3, flat, flat // 2]), imagej=True, metadata={"axes": "TYX"})
    # the spec's --series, a job's own image (--series all makes a job per position) and time point (--t all)
    outcomes = count_on_dask(spec, [(plate, tmp_path / "dask"), (plate, tmp_path / "dask0", 0),
                                    (movie, tmp_path / "dask_t3", 0, 3)],     # (the spec's series 1 is not its)
                             scheduler=cluster.scheduler_address, band_rows=2)
    assert [(o.error, o.series, o.summary["series"], o.t) for o in outcomes] == [
        (None, None, 1, None), (None, 0, 0, None), (None, 0, 0, 3)]
    assert_same_result(reference, tmp_path / "dask")
    assert_same_result(one_process(dataclasses.replace(spec, series=0), plate, tmp_path / "one0"), tmp_path / "dask0")
    assert_same_result(one_process(dataclasses.replace(spec, series=0, t=3), movie, tmp_path / "one_t3"),
                       tmp_path / "dask_t3")
    assert json_summary(tmp_path / "dask", "run.json")["fingerprint"]["options"]["series"] == 1
    assert json_summary(tmp_path / "dask0", "run.json")["fingerprint"]["options"]["series"] == 0


def corrupt_tiff(path: Path) -> Path:
    """A tiled TIFF whose header is sound and whose last tile's compressed bytes are zeros."""
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (192, 192), dtype=np.uint8), tile=(32, 32), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, size = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.slow
def test_cli_workers_count_like_one_process_and_report_a_bad_slide(tmp_path, tiny_bundle, capfd):
    """`cellseg count A B BAD --workers 2`: the tiny Mask R-CNN on a local cluster gives the cells of the
    single-process command; the bad slide is an error row of summary.csv (one line on stderr, no worker log), the
    others are ok; exit 1."""
    import torch
    image = np.asarray(Image.open(DATA / "dsb_fluo.png"))
    inputs = []
    for name, (r, c) in {"a": (0, 0), "b": (60, 90)}.items():
        inputs.append(tmp_path / f"{name}.png")
        Image.fromarray(image[r:r + 160, c:c + 128]).save(inputs[-1])
    inputs.append(corrupt_tiff(tmp_path / "bad.tif"))
    common = [*inputs, *FAST, "--model", tiny_bundle, "--band-rows", "1"]
    # torch's CPU arithmetic depends on its thread count (scores differ in the 6th digit): the single process gets
    # the threads each of 2 local workers gets (distributed.connect), so both do the same arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        serial = invoke(["count", *common, "-o", tmp_path / "serial"])
    finally:
        torch.set_num_threads(threads)
    capfd.readouterr()
    thread_settings = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    dask = invoke(["count", *common, "-o", tmp_path / "dask", "--workers", "2"])
    assert "Compute Failed" not in capfd.readouterr().err          # the workers' own log stays quiet
    # the workers' thread settings stay theirs: not left in the environment of the process that started them
    assert {k: os.environ.get(k) for k in thread_settings} == thread_settings
    for result in (serial, dask):
        assert result.exit_code == 1, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 2 and "1 of 3 inputs failed" in lines[1], lines
        assert lines[0].startswith(f"cellseg: error: {inputs[2]}: expected readable pixel data")
        assert "corrupt" in lines[0]
    for name in ("a", "b"):
        assert_same_result(tmp_path / "serial" / name, tmp_path / "dask" / name)
    with open(tmp_path / "dask" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert int(rows[0]["cell_count"]) > 0 and "corrupt" in rows[2]["error"]


def test_cli_workers_and_scheduler_together_is_a_usage_error(tmp_path):
    result = invoke(["count", tmp_path / "a.png", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "--workers" in result.stderr and "--scheduler" in result.stderr


@pytest.mark.slow
def test_an_unreachable_scheduler_is_one_line(tmp_path, tiny_bundle, monkeypatch):
    import cellseg.run.distributed
    monkeypatch.setattr(cellseg.run.distributed, "CONNECT_TIMEOUT", "1s")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "a.png")
    result = invoke(["count", tmp_path / "a.png", *FAST, "--model", tiny_bundle, "--scheduler", "tcp://127.0.0.1:9"])
    assert_user_error(result, 1, "expected a Dask scheduler at tcp://127.0.0.1:9", "could not reach")
    assert listing(tmp_path) == {"a.png"}


@pytest.mark.slow
def test_the_spec_settings_are_the_loaded_counters(tiny_bundle):
    """What the client fingerprints a journal with (no network built) equals what a worker's counter says."""
    spec = CounterSpec(load_protocol("fluorescence-nuclei").replace(model=str(tiny_bundle)), "cpu", mpp=0.5)
    assert spec.settings() == spec.load().settings()


def test_local_workers_are_started_ignoring_ctrl_c_which_this_process_keeps():
    """A terminal's Ctrl-C reaches the whole process group: local workers started within ignore it (Python keeps
    an ignored SIGINT ignored), so they print no traceback and do not go on alone; this process still gets it."""
    import subprocess
    import sys

    from cellseg.run.distributed import _ctrl_c_left_to_this_process
    before = signal.getsignal(signal.SIGINT)
    probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"]
    with _ctrl_c_left_to_this_process():
        started_within = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    assert started_within == "True"
    assert signal.getsignal(signal.SIGINT) is before
    assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "False"

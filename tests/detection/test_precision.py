"""Inference precision: bf16 where the CPU has it natively (auto), fp32 elsewhere or when asked; bf16 finds the same
nuclei as fp32 with the shipped model; the protocol and the command line choose it; --estimate times a few tiles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cellseg.errors import CellsegError

from ..helpers import DATA, LabelReadingDetector, invoke


def test_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    import cellseg.detection.precision as precision
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"sse4_2", "avx2", "avx512f", "avx512_vnni"})
    assert precision.resolve_precision("auto", "cpu")[0] == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == ("bf16", precision.resolve_precision("bf16", "cpu")[1])
    assert "emulated" in precision.resolve_precision("bf16", "cpu")[1]
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "amx_bf16"})     # Sapphire Rapids
    assert precision.resolve_precision("auto", "cpu")[0] == "bf16"
    with pytest.raises(CellsegError, match="expected a precision of auto, fp32, bf16, found 'fp16'"):
        precision.resolve_precision("fp16", "cpu")


def test_a_cap_on_onednn_below_bf16_means_fp32(monkeypatch):
    """ONEDNN_MAX_CPU_ISA below avx512_core_bf16 (a Zen 4 made to run a Zen 3's code paths) leaves oneDNN without
    bf16 instructions: auto must not pick bf16, which would then be emulated and slower than fp32."""
    import cellseg.detection.precision as precision
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})    # Zen 4
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.resolve_precision("auto", "cpu") == (
        "fp32", "fp32: ONEDNN_MAX_CPU_ISA=AVX2 leaves oneDNN no bf16 instructions")
    assert "emulated" in precision.resolve_precision("bf16", "cpu")[1]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert precision.resolve_precision("auto", "cpu")[0] == "bf16"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert precision.resolve_precision("auto", "cpu")[0] == "bf16"


def test_the_cpu_model_names_its_generation(tmp_path, monkeypatch):
    """Cloud AMD processors are all "AMD EPYC": the family and model numbers tell Zen 3 from Zen 4 and 5; caps on
    torch's kernels are named with it, so that a figure taken under them is not passed off as the processor's."""
    from cellseg.detection import cpu_model
    from cellseg.detection.precision import KERNEL_ISA_VARIABLES
    for name in KERNEL_ISA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC\nflags\t\t: avx512_bf16\n\nprocessor\t: 1\ncpu family\t: 99\n")
    assert cpu_model(info) == "AMD EPYC (family 25 model 17)"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert cpu_model(info) == ("AMD EPYC (family 25 model 17), kernels capped: ONEDNN_MAX_CPU_ISA=AVX2, "
                               "ATEN_CPU_CAPABILITY=avx2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    info.write_text("model name\t: Apple M2\n")
    assert cpu_model(info) == "Apple M2"


@pytest.mark.slow
def test_the_detector_takes_the_precision_it_is_given(monkeypatch, tiny_bundle):
    import torch

    import cellseg.detection.precision as precision
    from cellseg.bundles import load_bundle
    from cellseg.detection import Detector
    bundle = load_bundle(tiny_bundle)
    monkeypatch.setattr(precision, "cpu_flags", lambda: set())
    assert Detector.from_bundle(bundle, "cpu", score_threshold=0.5, mask_threshold=0.5,
                                precision="auto").autocast_dtype is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    detector = Detector.from_bundle(bundle, "cpu", score_threshold=0.0, mask_threshold=0.5, precision="auto")
    assert detector.autocast_dtype == torch.bfloat16 and detector.precision_note.startswith("bf16")
    # bf16 features reach RoIAlign (fp32 only on the CPU) and the predictors hand on fp32: detection runs through
    image = np.random.default_rng(0).random((3, 128, 128), dtype=np.float32)
    (found,) = detector.detect([image])
    assert found.scores.dtype == np.float32 and np.isfinite(found.scores).all()
    slide_detector = detector.calibrated([image])       # a slide's detector runs in the precision it was given
    assert slide_detector.slide_calibrated and slide_detector.autocast_dtype == torch.bfloat16
    (found,) = slide_detector.detect([image])
    assert found.scores.dtype == np.float32 and np.isfinite(found.scores).all()


@pytest.mark.slow
def test_bf16_finds_the_same_nuclei_as_fp32_with_the_shipped_model():
    """A real DSB2018 field through the shipped bundle: bf16 autocast keeps the count and the masks."""
    from PIL import Image

    from cellseg.bundles import load_bundle
    from cellseg.detection import Detector
    from cellseg.evaluation import match, pair_iou
    from cellseg.planning import measure_range, to_network_input
    bundle = load_bundle("nuclei")
    pixels = np.asarray(Image.open(DATA / "dsb_fluo.png"))
    pixels = pixels[..., :3] if pixels.ndim == 3 else pixels[..., None]
    image = to_network_input(pixels, measure_range(pixels))
    found = {}
    for p in ("fp32", "bf16"):
        detector = Detector.from_bundle(bundle, "cpu", score_threshold=bundle.threshold_for("fluorescence"),
                                        mask_threshold=0.5, precision=p)
        (det,) = detector.detect([image])
        found[p] = _instances(det, *image.shape[1:])
    n32, n16 = len(found["fp32"].scores), len(found["bf16"].scores)
    assert n32 > 20 and abs(n16 - n32) <= max(1, round(0.03 * n32)), (n32, n16)
    m = match(found["bf16"], found["fp32"], 0.5, ious=pair_iou(found["bf16"], found["fp32"]))
    assert m.tp >= 0.97 * n32 and float(np.median(m.pair_iou)) > 0.9


def _instances(det, height: int, width: int):
    import pycocotools.mask as mask_utils

    from cellseg.evaluation import ImageMasks
    rles = []
    for (r0, c0, r1, c1), m in zip(det.boxes, det.masks):
        full = np.zeros((height, width), np.uint8, order="F")
        full[r0:r1, c0:c1] = m
        rles.append(mask_utils.encode(full))
    n = len(rles)
    return ImageMasks("x", None, height, width, rles, np.asarray(det.boxes).reshape(-1, 4), det.scores,
                      np.zeros(n, bool), True)


@pytest.mark.slow
def test_precision_comes_from_the_protocol_and_the_command_line(tmp_path, tiny_bundle):
    image = shutil.copy(DATA / "dsb_fluo.png", tmp_path / "field.png")
    protocol = tmp_path / "p.toml"
    protocol.write_text('name = "p"\n[detection]\nprecision = "fp32"\n')
    result = invoke(["count", image, "--model", tiny_bundle, "-p", protocol, "-q", "--tile-size", "128",
                     "--halo", "16", "-o", tmp_path / "a"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["precision"] == "fp32 as asked"
    # the software and hardware it ran on, for whoever has to reproduce the count
    import torch
    assert run["environment"]["torch"] == torch.__version__ and run["environment"]["cpu"]
    assert run["environment"]["torch_threads"] >= 1 and {"python", "torchvision", "numpy", "system"} <= set(
        run["environment"])
    result = invoke(["count", image, "--model", tiny_bundle, "-p", protocol, "-q", "--tile-size", "128",
                     "--halo", "16", "-o", tmp_path / "b", "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "run.json").read_text())["precision"].startswith("bf16 as asked")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[detection]\nprecision = "int8"\n')
    result = invoke(["count", image, "-p", bad, "-q"])
    assert result.exit_code != 0 and "precision" in result.output and "int8" in result.output


def test_estimate_times_sample_tiles_and_extrapolates(tmp_path):
    import tifffile

    from cellseg.planning import Protocol
    from cellseg.run import estimate_count
    from cellseg.tissue.finder import TissueFinder
    labels = np.zeros((512, 768), np.uint16)
    image = np.full((512, 768), 10, np.uint8)
    for k, (r, c) in enumerate([(40, 40), (200, 300), (400, 700), (300, 500)], start=1):
        labels[r - 6:r + 6, c - 6:c + 6] = k
        image[r - 6:r + 6, c - 6:c + 6] = 200
    tifffile.imwrite(tmp_path / "s.tif", image)
    detector = LabelReadingDetector(labels, seconds_per_tile=0.05)
    protocol = Protocol(name="t", tile_size=128, halo_px=16, tissue_method="none")
    est = estimate_count(tmp_path / "s.tif", protocol, detector, TissueFinder("none"), sample_tiles=4)
    assert est.tiles_total == est.tiles_analysed == 24 and est.tiles_timed == 4
    assert 0.05 <= est.seconds_per_tile < 0.5
    assert est.seconds_total == pytest.approx(est.seconds_planning + 24 * est.seconds_per_tile)
    assert len(set(detector.seen)) == 5                 # a warm-up tile and 4 timed ones, nothing else
    assert "24 of 24 tiles to analyse" in est.describe() and "a count would take about" in est.describe()


@pytest.mark.slow
def test_count_estimate_writes_nothing(tmp_path, tiny_bundle):
    image = shutil.copy(DATA / "dsb_fluo.png", tmp_path / "field.png")
    before = set(p.name for p in tmp_path.iterdir())
    result = invoke(["count", image, "--model", tiny_bundle, "--estimate", "--tile-size", "128", "--halo", "16"])
    assert result.exit_code == 0, result.output
    assert "tiles to analyse" in result.output and "a count would take about" in result.output
    import torch
    assert f"{torch.get_num_threads()} threads" in result.output      # what the machine gave it (a container's quota)
    assert set(p.name for p in tmp_path.iterdir()) == before

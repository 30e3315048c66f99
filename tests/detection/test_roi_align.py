"""RoIAlign as matrix products (detection/roi_align.py) against torchvision's kernel."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from cellseg.detection import MatrixMultiScaleRoIAlign, matrix_roi_pools, roi_align_rows


def _boxes(n: int, extent: float, generator: torch.Generator) -> torch.Tensor:
    """xyxy boxes of every kind RoIAlign meets: sub-pixel, nucleus-sized, larger than the map, and hanging over
    (or lying wholly beyond) its edges."""
    corner = torch.rand(n, 2, generator=generator) * (extent * 1.4) - extent * 0.2
    size = torch.rand(n, 2, generator=generator) ** 3 * extent * 1.2
    size[: n // 8] *= 0.01                                   # thinner than a feature pixel
    return torch.cat([corner, corner + size], 1)


@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("output_size", [(7, 7), (14, 14), (5, 3)])
def test_roi_align_rows_matches_torchvisions_kernel(sampling_ratio, output_size):
    g = torch.Generator().manual_seed(sampling_ratio * 100 + output_size[1])
    features = torch.randn(2, 6, 37, 83, generator=g).contiguous(memory_format=torch.channels_last)
    for scale in (1.0, 0.25, 1 / 32):
        boxes = _boxes(300, 83 / scale, g)
        rois = torch.cat([torch.randint(0, 2, (300, 1), generator=g).float(), boxes], 1)
        expected = roi_align(features.contiguous(), rois, output_size, scale, sampling_ratio)
        out = torch.full((300 + 5, *output_size, 6), float("nan"))
        rows = torch.randperm(305, generator=g)[:300]
        roi_align_rows(out, rows, features, rois, scale, sampling_ratio)
        got = out[rows].permute(0, 3, 1, 2)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
        others = torch.ones(305, dtype=torch.bool)
        others[rows] = False
        assert out[others].isnan().all()                      # rows it was not given are left as they were


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (1, 5)])
def test_roi_align_rows_on_maps_of_a_pixel_or_two(shape):
    """The coarsest FPN levels of a small crop: every sample clamped to the last row or column."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1, 4, *shape, generator=g)
    rois = torch.cat([torch.zeros(50, 1), _boxes(50, 40, g)], 1)
    out = torch.empty(50, 7, 7, 4)
    roi_align_rows(out, torch.arange(50), features, rois, 1 / 8, 2)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), roi_align(features, rois, (7, 7), 1 / 8, 2), rtol=0, atol=2e-5)


def test_roi_align_rows_in_small_chunks_gives_the_same_output(monkeypatch):
    import cellseg.detection.roi_align as matrix

    g = torch.Generator().manual_seed(7)
    features = torch.randn(2, 6, 37, 83, generator=g).contiguous(memory_format=torch.channels_last)
    rois = torch.cat([torch.randint(0, 2, (200, 1), generator=g).float(), _boxes(200, 83 * 4, g)], 1)
    outs = []
    for budget in (matrix.WORK_BYTES, 1, 50_000):      # all at once, one RoI at a time, a few dozen at a time
        monkeypatch.setattr(matrix, "WORK_BYTES", budget)
        out = torch.empty(200, 7, 7, 6)
        roi_align_rows(out, torch.arange(200), features, rois, 0.25, 2)
        outs.append(out)
    for other in outs[1:]:   # batched products may sum in another order: equal to float rounding
        torch.testing.assert_close(other, outs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[0].permute(0, 3, 1, 2), roi_align(features.contiguous(), rois, (7, 7), 0.25, 2),
                               rtol=0, atol=2e-5)


def test_roi_align_rows_wants_a_fixed_sampling_ratio():
    with pytest.raises(ValueError, match="fixed sampling ratio"):
        roi_align_rows(torch.empty(1, 7, 7, 4), torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, 8, 8),
                       torch.tensor([[0.0, 1, 1, 5, 5]]), 1.0, 0)


def _pyramid(channels_last: bool):
    g = torch.Generator().manual_seed(1)
    features = {str(k): torch.randn(3, 8, 160 // 2 ** k, 160 // 2 ** k, generator=g) for k in range(4)}
    if channels_last:
        features = {k: v.contiguous(memory_format=torch.channels_last) for k, v in features.items()}
    boxes = []
    for n in (300, 0, 170):     # an image without boxes in the middle
        b = torch.rand(n, 4, generator=g) * 500
        b[:, 2:] = b[:, :2] + 1 + torch.rand(n, 2, generator=g) ** 2 * 600   # all four levels get RoIs
        boxes.append(b)
    return features, boxes, [(640, 640)] * 3


@pytest.mark.parametrize("channels_last", [True, False])
def test_matrix_pooler_matches_torchvisions_in_inference(channels_last):
    features, boxes, shapes = _pyramid(channels_last)
    for size in (7, 14):
        plain = MultiScaleRoIAlign(["0", "1", "2", "3"], size, 2)
        expected = plain(features, boxes, shapes)
        assert len(set(plain.map_levels(boxes).tolist())) == 4
        matrix = MatrixMultiScaleRoIAlign.replacing(MultiScaleRoIAlign(["0", "1", "2", "3"], size, 2))
        with torch.inference_mode():
            got = matrix(features, boxes, shapes)
        assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_matrix_pooler_under_bf16_autocast_hands_on_its_fp32_result_rounded():
    features, boxes, shapes = _pyramid(True)
    matrix = MatrixMultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
    with torch.inference_mode():
        fp32 = matrix(features, boxes, shapes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = matrix({k: v.bfloat16() for k, v in features.items()} | {"pool": features["3"]}, boxes,
                          shapes)
            again = matrix(features, boxes, shapes)
    assert bf16.dtype == again.dtype == torch.bfloat16
    assert torch.equal(again, fp32.bfloat16())
    # bf16 features (a network run wholly in bf16) are pooled in fp32 from their values
    torch.testing.assert_close(bf16.float(), fp32, rtol=2e-2, atol=2e-2)


def test_matrix_pooler_gradients_match_torchvisions():
    features, boxes, shapes = _pyramid(True)
    plain = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
    matrix = MatrixMultiScaleRoIAlign.replacing(plain)
    weights = torch.randn(470, 8, 14, 14, generator=torch.Generator().manual_seed(2))
    grads = []
    for pooler in (plain, matrix):
        levels = {k: v.detach().clone().requires_grad_() for k, v in features.items()}
        out = pooler(levels, boxes, shapes)
        grads.append(torch.autograd.grad((out * weights).sum(), list(levels.values())))
    for want, got in zip(*grads):
        assert want.abs().max() > 1
        torch.testing.assert_close(got, want, rtol=0, atol=5e-5)


def test_matrix_pooler_leaves_adaptive_sampling_to_torchvision():
    features, boxes, shapes = _pyramid(False)
    adaptive = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0)
    with torch.inference_mode():
        assert torch.equal(MatrixMultiScaleRoIAlign.replacing(adaptive)(features, boxes, shapes),
                           adaptive(features, boxes, shapes))


def test_matrix_roi_pools_replaces_both_heads_poolers_once():
    from cellseg.bundles import ModelConfig
    from cellseg.detection import build_model

    model = build_model(ModelConfig())
    matrix_roi_pools(model)
    box, mask = model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool
    assert isinstance(box, MatrixMultiScaleRoIAlign) and isinstance(mask, MatrixMultiScaleRoIAlign)
    assert (box.output_size, mask.output_size) == ((7, 7), (14, 14))
    matrix_roi_pools(model)
    assert model.roi_heads.box_roi_pool is box

"""references/nuclei/mask_resolution.py: the round trip a perfect M x M mask head allows."""

import numpy as np

from references.nuclei.mask_resolution import dsb_score, nuclei_of, resample_labels, round_trip_ious


def _disk(radius: float, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - size / 2 + 0.3) ** 2 + (xx - size / 2 - 0.2) ** 2 <= radius ** 2).astype(np.int32)


def test_round_trip_keeps_a_nucleus_and_finer_grids_keep_more():
    labels = _disk(10)
    labels[5:12, 40:44] = 2                  # a small elongated one beside it
    crops, boxes = nuclei_of(labels)
    assert len(crops) == 2 and boxes[1].tolist() == [5, 40, 12, 44]
    coarse, fine = round_trip_ious(crops, boxes, 7), round_trip_ious(crops, boxes, 28)
    assert (fine > 0.9).all()
    assert fine.mean() > coarse.mean()


def test_dsb_score_counts_each_miss_twice():
    assert dsb_score(np.ones(4)) == 1.0
    # two of four nuclei at IoU 0.6: at 0.5 and 0.55 all four match, from 0.6 two do (2 / (8 - 2))
    score = dsb_score(np.array([1.0, 1.0, 0.6, 0.6]))
    assert np.isclose(score, (2 * 1.0 + 8 * (2 / 6)) / 10)


def test_resample_labels_keeps_labels_whole_numbers():
    labels = _disk(6, 32)
    twice = resample_labels(labels, 2.0)
    assert twice.shape == (64, 64) and set(np.unique(twice)) == {0, 1}
    assert abs(twice.sum() / labels.sum() - 4) < 0.3

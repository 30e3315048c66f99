"""Copy-paste augmentation (cellseg.training.copy_paste) and the anisotropic zoom of training crops: pasted nuclei
arrive whole, nothing already in the crop is covered, labels stay one per pixel, boxes tight."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellseg.training import Augmentation, TrainImage, paste_nuclei, sample_crop, train_image_from_labels
from cellseg.training.copy_paste import donor_nucleus


def disc_image(rng: np.random.Generator, size: int, n: int, radius: int, colour: bool = False) -> TrainImage:
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for k in range(n):
        r, c = rng.integers(radius, size - radius, 2)
        rr = radius + int(rng.integers(-radius // 3, radius // 3 + 1))
        labels[((yy - r) ** 2 + ((xx - c) * rng.uniform(0.7, 1.3)) ** 2 <= rr ** 2) & (labels == 0)] = k + 1
    gray = np.where(labels > 0, 200.0, 20.0) + rng.normal(0, 5, labels.shape)
    pixels = np.clip(gray, 0, 255).astype(np.uint8)[..., None]
    if colour:
        pixels = np.clip(np.concatenate([pixels, pixels * 0.6, 255 - pixels], -1), 0, 255).astype(np.uint8)
    labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)   # consecutive ids, none empty
    return train_image_from_labels(pixels, labels)


PASTE_ALWAYS = dataclasses.replace(Augmentation(), paste_p=1.0, paste_count=(5, 25))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 12), radius=st.integers(3, 9),
       scale_r=st.floats(0.5, 2.0), scale_c=st.floats(0.5, 2.0), touch=st.floats(0, 1), dim=st.floats(0, 1),
       empty=st.integers(0, 2))
def test_pasted_nuclei_are_whole_cover_nothing_and_keep_one_label_per_pixel(seed, n, radius, scale_r, scale_c,
                                                                           touch, dim, empty):
    rng = np.random.default_rng(seed)
    donor = disc_image(rng, 64, max(1, n), radius, colour=bool(seed % 2))
    crop = disc_image(rng, 48, n, radius, colour=bool(seed % 2))
    masks = np.zeros((len(crop.masks), 48, 48), bool)
    for k, (box, m) in enumerate(zip(crop.boxes, crop.masks)):
        masks[k, box[0]:box[2], box[1]:box[3]] = m
    # a crop can keep nuclei it cut to no pixels (the v4 copy-paste run died on one taken as a neighbour to touch)
    masks = np.concatenate([masks, np.zeros((empty, 48, 48), bool)])
    classes = np.concatenate([crop.class_ids, np.ones(empty, crop.class_ids.dtype)])
    aug = dataclasses.replace(PASTE_ALWAYS, paste_touch_p=touch, paste_dim_p=dim)
    image, out_masks, out_classes = paste_nuclei(crop.image, masks, classes, donor, (scale_r, scale_c),
                                                 np.random.default_rng(seed), aug)
    assert len(out_masks) == len(out_classes) >= len(masks)
    assert np.array_equal(out_masks[:len(masks)], masks)               # the crop's nuclei untouched
    assert out_masks.sum(0).max(initial=0) <= 1                        # no pixel with two labels
    pasted = out_masks[len(masks):]
    donor_sizes = {int(donor_nucleus(donor, i, (scale_r, scale_c))[1].sum()) for i in range(len(donor.boxes))}
    for m in pasted:
        assert m.sum() >= 4 and int(m.sum()) in donor_sizes             # whole: a donor nucleus's every pixel
    changed = np.any(image != crop.image, axis=0)
    assert not (changed & ~pasted.any(0)).any() if len(pasted) else np.array_equal(image, crop.image)


def test_a_crop_with_paste_and_anisotropic_zoom_keeps_tight_boxes_and_consistent_masks():
    rng = np.random.default_rng(3)
    item = disc_image(rng, 160, 25, 6)
    aug = dataclasses.replace(PASTE_ALWAYS, aspect_p=1.0, aspect=2.0)
    pasted_some = False
    for _ in range(20):
        img, target = sample_crop(item, 96, rng, aug)
        masks = target["masks"].numpy().astype(bool)
        boxes = target["boxes"].numpy()
        assert img.shape[1:] == masks.shape[1:] and len(masks) == len(boxes) == len(target["labels"])
        assert masks.sum(0).max(initial=0) <= 1
        for m, (x0, y0, x1, y1) in zip(masks, boxes):
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            assert (x0, y0, x1, y1) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        pasted_some |= len(masks) > sum(1 for _ in item.masks)
    assert pasted_some


def test_anisotropic_zoom_makes_round_nuclei_elongated():
    yy, xx = np.mgrid[:128, :128]
    labels = np.zeros((128, 128), np.int32)
    for k, (r, c) in enumerate([(32, 32), (32, 96), (96, 32), (96, 96)]):
        labels[(yy - r) ** 2 + (xx - c) ** 2 <= 12 ** 2] = k + 1
    item = train_image_from_labels(np.where(labels > 0, 200, 20).astype(np.uint8)[..., None], labels)
    aug = dataclasses.replace(Augmentation(), scale=(1.0, 1.0), aspect_p=1.0, aspect=2.0, nucleus_centred_p=0.0)
    ratios = []
    for seed in range(10):
        _, target = sample_crop(item, 256, np.random.default_rng(seed), aug)
        x0, y0, x1, y1 = target["boxes"][0].tolist()
        ratios.append(max((x1 - x0) / (y1 - y0), (y1 - y0) / (x1 - x0)))
    assert max(ratios) > 1.4 and min(ratios) >= 1.0


def test_paste_and_aspect_off_leave_the_crop_stream_unchanged():
    """With the new settings at their defaults (off), crops are those of the recipe before them: a resumed run
    draws the crops it would have drawn."""
    item = disc_image(np.random.default_rng(5), 128, 12, 6)
    a = sample_crop(item, 64, np.random.default_rng(9), Augmentation())
    b = sample_crop(item, 64, np.random.default_rng(9), dataclasses.replace(Augmentation(), aspect=3.0,
                                                                            paste_count=(1, 2)))
    assert np.array_equal(a[0].numpy(), b[0].numpy()) and np.array_equal(a[1]["masks"], b[1]["masks"])


@pytest.mark.parametrize("field", ["paste_p", "aspect_p"])
def test_the_card_names_copy_paste_and_anisotropic_zoom_when_on(field):
    assert "copy-paste" not in Augmentation().describe() and "anisotropic" not in Augmentation().describe()
    text = dataclasses.replace(Augmentation(), **{field: 0.5}).describe()
    assert ("copy-paste" if field == "paste_p" else "anisotropic zoom") in text

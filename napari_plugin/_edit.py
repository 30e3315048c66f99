"""Mask corrections beyond napari's own paint, erase and fill: split one nucleus in two, merge several into one,
delete one. Pure functions on a label image (0 = background), tested without a display.

Each returns a new label image; `changes(old, new)` gives the (indices, values) that napari's
`Labels.data_setitem` takes, so that an edit lands in the layer's undo history like a brush stroke.
Coordinates are (row, col) in the label image's pixels; a line is an (n, 2) polyline of such points
(napari puts pixel i's centre at i).
"""

from __future__ import annotations

import numpy as np

from cellseg.errors import ParameterError


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ParameterError(f"expected a 2-D integer label image, got {labels.dtype} of shape {labels.shape}")
    return labels


def _line_pixels(labels_shape: tuple[int, int], line) -> tuple[np.ndarray, np.ndarray]:
    """The pixels a polyline passes through (8-connected, in order, clipped to the image)."""
    from skimage.draw import line as draw_line

    points = np.asarray(line, np.float64).reshape(-1, 2)
    if len(points) < 2:
        raise ParameterError(f"expected a line of at least two points, got {len(points)}")
    ends = np.floor(points + 0.5).astype(np.int64)
    rows, cols = [], []
    for (r0, c0), (r1, c1) in zip(ends[:-1], ends[1:]):
        rr, cc = draw_line(int(r0), int(c0), int(r1), int(c1))
        rows.append(rr)
        cols.append(cc)
    rr, cc = np.concatenate(rows), np.concatenate(cols)
    inside = (rr >= 0) & (rr < labels_shape[0]) & (cc >= 0) & (cc < labels_shape[1])
    return rr[inside], cc[inside]


def labels_along(labels, line) -> list[int]:
    """The labels a polyline crosses, in the order it meets them (background left out)."""
    labels = _check_labels(labels)
    rr, cc = _line_pixels(labels.shape, line)
    seen: list[int] = []
    for value in labels[rr, cc].tolist():
        if value and value not in seen:
            seen.append(int(value))
    return seen


def _present(labels: np.ndarray, label: int) -> None:
    if label == 0 or not (labels == label).any():
        raise ParameterError(f"expected a label of the image to edit (pick one with the colour picker), got {label}")


def split_label(labels, label: int | None = None, line=None) -> np.ndarray:
    """Split one nucleus in two (or more): along `line` when given, else at its neck.

    With a line, the label cut is `label`, or when None the one the line crosses over the most pixels; the pixels
    of the line become part of the nearest piece, the largest piece keeps the id and each other piece gets a new
    one (max + 1, ...). Without a line: a watershed on the distance to the background from its two farthest-apart
    maxima, or, for a convex blob with a single maximum, a cut across its long axis through its centre.
    ParameterError when there is nothing to split (one pixel; a line that does not cut the label through).
    """
    from scipy import ndimage as ndi

    labels = _check_labels(labels)
    if line is not None and label is None:
        rr, cc = _line_pixels(labels.shape, line)
        crossed = labels[rr, cc]
        crossed = crossed[crossed > 0]
        if crossed.size == 0:
            raise ParameterError("expected the line to cross a nucleus to split, it crosses none")
        values, counts = np.unique(crossed, return_counts=True)
        label = int(values[np.argmax(counts)])
    if label is None:
        raise ParameterError("expected a label to split (pick one) or a line across it, got neither")
    _present(labels, label)
    rows, cols = np.nonzero(labels == label)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    mask = labels[r0:r1, c0:c1] == label
    if mask.sum() < 2:
        raise ParameterError(f"expected a nucleus of at least two pixels to split, label {label} has one")
    if line is not None:
        rr, cc = _line_pixels(labels.shape, line)
        cut = np.zeros_like(mask)
        keep = (rr >= r0) & (rr < r1) & (cc >= c0) & (cc < c1)
        cut[rr[keep] - r0, cc[keep] - c0] = True
        pieces, n = ndi.label(mask & ~cut)           # 4-connected: an 8-connected line separates them
        if n < 2:
            raise ParameterError(f"expected the line to cut label {label} through, from background to background; "
                                 "draw it right across the nucleus")
        # the line's own pixels join the nearest piece
        _, (ir, ic) = ndi.distance_transform_edt(pieces == 0, return_indices=True)
        pieces = np.where(mask, pieces[ir, ic], 0)
    else:
        pieces = _split_at_neck(mask)
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    order = np.argsort(-sizes[1:], kind="stable") + 1       # the largest piece keeps the id
    next_id = int(labels.max()) + 1
    ids = np.zeros(len(sizes), labels.dtype)
    ids[order[0]] = label
    for k, piece in enumerate(order[1:]):
        if sizes[piece]:
            ids[piece] = next_id + k
    out = labels.copy()
    window = out[r0:r1, c0:c1]
    window[mask] = ids[pieces[mask]]
    return out


def _split_at_neck(mask: np.ndarray) -> np.ndarray:
    """(h, w) pieces 1 and 2 of a binary blob: watershed from the two farthest-apart maxima of its distance map,
    else halves across its long axis."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    padded = np.pad(mask, 1)
    distance = ndi.distance_transform_edt(padded)[1:-1, 1:-1]
    diameter = 2 * np.sqrt(mask.sum() / np.pi)
    peaks = peak_local_max(distance, min_distance=max(1, int(diameter / 6)), labels=mask.astype(np.int32),
                           exclude_border=False)
    if len(peaks) >= 2:
        # the two maxima farthest apart: the centres of the two nuclei that touch
        d = np.hypot(*(peaks[:, None, :] - peaks[None, :, :]).transpose(2, 0, 1))
        i, j = np.unravel_index(np.argmax(d), d.shape)
        markers = np.zeros(mask.shape, np.int32)
        markers[tuple(peaks[i])] = 1
        markers[tuple(peaks[j])] = 2
        pieces = watershed(-distance, markers, mask=mask)
        if (np.bincount(pieces.ravel(), minlength=3)[1:3] > 0).all():
            return pieces
    rows, cols = np.nonzero(mask)
    points = np.stack([rows, cols], 1).astype(np.float64)
    centred = points - points.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    side = centred @ vt[0] >= 0                     # which side of the line across the long axis
    if side.all() or not side.any():
        side = np.arange(len(points)) >= len(points) // 2
    pieces = np.zeros(mask.shape, np.int32)
    pieces[rows, cols] = np.where(side, 1, 2)
    return pieces


def merge_labels(labels, ids) -> np.ndarray:
    """The nuclei `ids` (at least two) become one, with the first's id."""
    labels = _check_labels(labels)
    ids = [int(i) for i in dict.fromkeys(ids) if i]
    if len(ids) < 2:
        raise ParameterError(f"expected at least two nuclei to merge (draw a line across them), got {len(ids)}")
    for i in ids:
        _present(labels, i)
    out = labels.copy()
    out[np.isin(labels, ids[1:])] = ids[0]
    return out


def delete_labels(labels, ids) -> np.ndarray:
    """The nuclei `ids` become background."""
    labels = _check_labels(labels)
    ids = [int(i) for i in ids if i]
    if not ids:
        raise ParameterError("expected a nucleus to delete (pick one with the colour picker), got none")
    for i in ids:
        _present(labels, i)
    out = labels.copy()
    out[np.isin(labels, ids)] = 0
    return out


def changes(old, new) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(indices, values) of the pixels where `new` differs from `old`: napari's Labels.data_setitem arguments."""
    old, new = np.asarray(old), np.asarray(new)
    where = np.nonzero(old != new)
    return where, new[where]

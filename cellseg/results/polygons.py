"""Pixel-edge polygons of many box-cropped masks at once (cells.geojson's geometries).

A mask's polygon follows the edges between its set pixels and the unset ones around them: pixel (row, col) is the
square [col, col + 1] x [row, row + 1] (x = column, y = row, level-0 px), so a polygon's area is exactly the mask's
pixel count. Every boundary edge is a crack between a set pixel and an unset neighbour; with the set pixel on its
left (image frame, y down) the cracks chain into closed rings: outlines run anticlockwise on screen (down the left
side first), holes the other way. Where two set pixels meet only at a corner the chain keeps to the pixel it came
along (4-connected pieces, as scikit-image's find_contours does by default), so a mask's separate pieces are
separate polygons and rings never cross.

Most nuclei are one run of pixels per row, each run sharing an edge with the next: their ring comes straight from
the runs' ends (down the left ends, up the right ends), a few numbers per row for all of a tile's masks at once. The
others are traced. Tracing is whole-array numpy over the set pixels of all those masks (no per-mask loop): the cracks,
each crack's successor (three local cases: turn left onto the same pixel, go straight on, turn right onto the
diagonal pixel), then one pass of a Python loop over the successor links to put each ring's corners in order.
The rare ring that passes twice through a corner (a hole whose only way out is a diagonal) is split there, so every
ring is simple and the result is valid (OGC/GEOS): a hole may touch its outline at one point, two pieces may touch
at one point. Each ring starts at its top-left corner (smallest row, then column) and lists corners only.
"""

from __future__ import annotations

import numpy as np

# The four cracks of a pixel, in the order a ring turns left through them (set pixel on the left, y down):
# top (towards -x), left (+y), bottom (+x), right (-y).
TOP, LEFT, BOTTOM, RIGHT = 0, 1, 2, 3


def mask_geometries(boxes: np.ndarray, masks: list[np.ndarray]) -> list[dict | None]:
    """The GeoJSON geometry ("Polygon" or "MultiPolygon", integer pixel-corner coordinates x = column, y = row) of
    each bool mask `masks[k]`, cropped to its box `boxes[k]` = (row0, col0, row1, col1) in slide px; None for an
    empty mask. Polygons list their outline, then their holes (each ring closed, first point repeated)."""
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    n = len(masks)
    out: list[dict | None] = [None] * n
    if n == 0:
        return out
    rings = _rings(boxes, masks)
    if rings is None:
        return out
    ring_mask, ring_points, outer = rings
    # Rings come grouped by mask; within a mask, by their first corner (row-major).
    bounds = np.flatnonzero(np.r_[True, ring_mask[1:] != ring_mask[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        k = int(ring_mask[a])
        if b - a == 1:
            out[k] = {"type": "Polygon", "coordinates": [ring_points[a]]}
            continue
        shells = [ring_points[i] for i in range(a, b) if outer[i]]
        holes = [ring_points[i] for i in range(a, b) if not outer[i]]
        if len(shells) == 1:
            out[k] = {"type": "Polygon", "coordinates": shells + holes}
        elif not holes:
            out[k] = {"type": "MultiPolygon", "coordinates": [[s] for s in shells]}
        else:
            out[k] = {"type": "MultiPolygon", "coordinates": _nest(shells, holes)}
    return out


def mask_geometry(mask: np.ndarray, row0: int, col0: int) -> dict | None:
    """mask_geometries of one mask placed with its top-left pixel at (row0, col0)."""
    mask = np.asarray(mask, bool)
    box = np.array([[row0, col0, row0 + mask.shape[0], col0 + mask.shape[1]]], np.int64)
    return mask_geometries(box, [mask])[0]


def _rings(boxes: np.ndarray, masks: list[np.ndarray]):
    """(mask of each ring, each ring's closed [[x, y], ...] corner list, whether it is an outline), rings sorted by
    mask then first corner; None when every mask is empty.

    Most nuclei are one run of pixels per row, each run sharing an edge with the next: their outline comes straight
    from the runs' ends (_run_outlines, a few numbers per row instead of four cracks per pixel). The others (holes,
    notches that split a row, pieces) are traced crack by crack (_traced_rings); both give the same rings."""
    heights = (boxes[:, 2] - boxes[:, 0]).astype(np.int64)
    widths = (boxes[:, 3] - boxes[:, 1]).astype(np.int64)
    sizes = heights * widths
    flat = (np.concatenate([np.asarray(m, bool).reshape(-1) for m in masks]) if len(masks)
            else np.zeros(0, bool))
    if flat.size != sizes.sum():
        raise ValueError(f"expected masks of their boxes' sizes ({sizes.sum()} px in all), got {flat.size} px")
    nz = np.flatnonzero(flat)
    if not len(nz):
        return None
    rest, outlines = _run_outlines(boxes, heights, widths, flat, nz)
    if not len(rest):
        return outlines
    traced = _traced_rings(boxes[rest], [masks[i] for i in rest.tolist()])
    ring_mask = np.concatenate([outlines[0], rest[traced[0]]])
    points = outlines[1] + traced[1]
    outer = np.concatenate([outlines[2], traced[2]])
    order = np.argsort(ring_mask, kind="stable")       # each mask's rings stay in their order
    return ring_mask[order], [points[i] for i in order.tolist()], outer[order]


def _run_outlines(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray, flat: np.ndarray, nz: np.ndarray):
    """The masks with pixels that are not one run per row, their rows unbroken and each run sharing an edge with
    the next (they need tracing), and the outlines of those that are, as _rings gives them: one ring, down the
    runs' left ends and up their right ends. flat: the masks' pixels, row-major, one after another; nz: flat's set
    pixels."""
    row_len = np.repeat(widths, heights)                    # every row of every mask
    row_start = np.cumsum(row_len) - row_len
    row_mask = np.repeat(np.arange(len(widths)), heights)
    # Runs per row: set pixels whose left neighbour in the row is unset.
    first_col = np.zeros(len(flat), bool)
    first_col[row_start[row_len > 0]] = True
    begins = np.flatnonzero(flat & (first_col | ~np.r_[False, flat[:-1]]))
    runs = np.bincount(np.searchsorted(row_start, begins, side="right") - 1, minlength=len(row_len))
    # Each row with pixels: its first and last set pixel.
    nz_row = np.searchsorted(row_start, nz, side="right") - 1
    head = np.flatnonzero(np.r_[True, nz_row[1:] != nz_row[:-1]])
    tail = np.r_[head[1:], len(nz)] - 1
    rows = nz_row[head]                                     # the rows with pixels, ascending
    left = nz[head] - row_start[rows]
    right = nz[tail] - row_start[rows] + 1
    mask = row_mask[rows]
    # A mask qualifies when its rows with pixels are consecutive, each one run, each overlapping the next.
    same = mask[1:] == mask[:-1]
    bad_step = same & ((rows[1:] != rows[:-1] + 1) | (np.maximum(left[1:], left[:-1]) >= np.minimum(right[1:],
                                                                                                  right[:-1])))
    bad = np.zeros(len(widths), bool)
    bad[mask[1:][bad_step]] = True
    bad[mask[runs[rows] != 1]] = True
    has_pixels = np.zeros(len(widths), bool)
    has_pixels[mask] = True
    keep = ~bad[mask]
    rows, left, right, mask = rows[keep], left[keep], right[keep], mask[keep]
    rest = np.flatnonzero(has_pixels & bad)
    if not len(rows):
        return rest, (np.zeros(0, np.int64), [], np.zeros(0, bool))
    y = boxes[mask, 0] + rows - (np.cumsum(heights) - heights)[mask]     # the row within the mask, in slide px
    x0, xe = boxes[mask, 1] + left, boxes[mask, 1] + right
    top = np.r_[True, mask[1:] != mask[:-1]]                # each mask's first row
    bottom = np.r_[mask[1:] != mask[:-1], True]
    new_left = top | np.r_[True, x0[1:] != x0[:-1]]         # A: (x0, y) at a row whose left end moved (or the top)
    leaves_left = bottom | np.r_[x0[1:] != x0[:-1], True]   # B: (x0, y + 1) where the next row's left end moves
    leaves_right = bottom | np.r_[xe[1:] != xe[:-1], True]  # C: (xe, y + 1), going up
    new_right = top | np.r_[True, xe[1:] != xe[:-1]]        # D: (xe, y)
    # Slots: per mask of n rows, A0 B0 A1 B1 ... then C(n-1) D(n-1) ... C0 D0, then A0 again to close the ring.
    n = np.bincount(mask, minlength=len(widths))[mask]
    first = np.flatnonzero(top)
    i = np.arange(len(mask)) - np.repeat(first, np.diff(np.r_[first, len(mask)]))   # row within its mask's runs
    start = np.repeat(np.cumsum(4 * n[first] + 1) - (4 * n[first] + 1), np.diff(np.r_[first, len(mask)]))
    slots = int((4 * n[first] + 1).sum())
    sx = np.zeros(slots, np.int64)
    sy = np.zeros(slots, np.int64)
    keep_slot = np.zeros(slots, bool)
    for offset, xs, ys, kept in ((start + 2 * i, x0, y, new_left), (start + 2 * i + 1, x0, y + 1, leaves_left),
                                 (start + 2 * n + 2 * (n - 1 - i), xe, y + 1, leaves_right),
                                 (start + 2 * n + 2 * (n - 1 - i) + 1, xe, y, new_right),
                                 ((start + 4 * n)[first], x0[first], y[first], top[first])):
        sx[offset], sy[offset], keep_slot[offset] = xs, ys, kept
    slot_mask = np.repeat(mask[first], 4 * n[first] + 1)[keep_slot]
    points = np.stack([sx[keep_slot], sy[keep_slot]], 1).tolist()
    ends = np.flatnonzero(np.r_[slot_mask[1:] != slot_mask[:-1], True]) + 1
    rings = [points[a:b] for a, b in zip(np.r_[0, ends[:-1]].tolist(), ends.tolist())]
    return rest, (mask[first], rings, np.ones(len(first), bool))


def _traced_rings(boxes: np.ndarray, masks: list[np.ndarray]):
    """_rings of masks with pixels, traced crack by crack."""
    heights = (boxes[:, 2] - boxes[:, 0]).astype(np.int64)
    widths = (boxes[:, 3] - boxes[:, 1]).astype(np.int64)
    sizes = heights * widths
    flat = np.concatenate([np.asarray(m, bool).reshape(-1) for m in masks])
    nz = np.flatnonzero(flat)
    # Each mask padded by one unset pixel all round, all of them in one flat array: a set pixel's four neighbours
    # are p -/+ 1 and p -/+ W (W its mask's padded width) and never another mask's.
    pw = widths + 2
    psizes = (heights + 2) * pw
    offset = np.cumsum(sizes) - sizes
    poffset = np.cumsum(psizes) - psizes
    k = np.searchsorted(offset, nz, side="right") - 1
    # a zero-size mask shares its offset with the next one: searchsorted(side="right") picks the last of them
    local = nz - offset[k]
    r, c = local // widths[k], local % widths[k]
    W = pw[k]
    p = poffset[k] + (r + 1) * W + (c + 1)
    padded = np.zeros(int(psizes.sum()), bool)
    padded[p] = True
    # The cracks of each set pixel (row-major within a mask: p ascending).
    has = np.stack([~padded[p - W], ~padded[p - 1], ~padded[p + W], ~padded[p + 1]], axis=1)
    up_left, down_left = padded[p - W - 1], padded[p + W - 1]
    down_right, up_right = padded[p + W + 1], padded[p - W + 1]
    left_set, below_set, right_set, above_set = ~has[:, LEFT], ~has[:, BOTTOM], ~has[:, RIGHT], ~has[:, TOP]
    # Successor of each crack, as (pixel, crack) (three cases each: left turn on this pixel, straight on along the
    # neighbour ahead, right turn onto the diagonal pixel).
    nxt_p = np.empty((len(p), 4), np.int64)
    nxt_k = np.empty((len(p), 4), np.int64)
    for crack, turn, ahead, diagonal, ahead_set, diagonal_set in (
            (TOP, LEFT, p - 1, p - W - 1, left_set, up_left),
            (LEFT, BOTTOM, p + W, p + W - 1, below_set, down_left),
            (BOTTOM, RIGHT, p + 1, p + W + 1, right_set, down_right),
            (RIGHT, TOP, p - W, p - W + 1, above_set, up_right)):
        straight = ahead_set & ~diagonal_set
        nxt_p[:, crack] = np.where(~ahead_set, p, np.where(straight, ahead, diagonal))
        # right turn: the diagonal pixel's crack one step clockwise of this one
        nxt_k[:, crack] = np.where(~ahead_set, turn, np.where(straight, crack, (crack + 3) % 4))
    ids = (p[:, None] * 4 + np.arange(4))[has]                     # ascending: p ascending, then crack
    succ = np.searchsorted(ids, (nxt_p * 4 + nxt_k)[has])
    kind = np.broadcast_to(np.arange(4), has.shape)[has]
    pix = np.repeat(np.arange(len(p)), has.sum(1))
    turns = kind[succ] != kind                                      # a corner at this crack's end
    # Each crack's end corner, in slide px.
    x = boxes[k, 1] + c
    y = boxes[k, 0] + r
    ex = x[pix] + (kind == BOTTOM) + (kind == RIGHT)
    ey = y[pix] + (kind == LEFT) + (kind == BOTTOM)
    # Walk the corners only: from each corner crack straight to the next corner crack.
    corner = np.flatnonzero(turns)
    next_corner = _next_turn(succ, turns)
    order, starts = _cycles(next_corner, corner)
    mask_of = k[pix[order]]
    cx, cy = ex[order], ey[order]
    return _finish_rings(mask_of, cx, cy, starts)


def _next_turn(succ: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """For each crack, the first crack at or after its successor that ends in a corner. Pointer doubling: an
    unresolved crack i knows that the cracks from i up to jump[i] run straight on; each round doubles that stretch."""
    first_turn = np.where(turns, np.arange(len(succ)), -1)      # the first corner crack at or after each crack
    jump = succ.copy()
    todo = np.flatnonzero(~turns)
    while len(todo):
        got = first_turn[jump[todo]]
        done = got >= 0
        first_turn[todo[done]] = got[done]
        todo = todo[~done]
        jump[todo] = jump[jump[todo]]
    return first_turn[succ]


def _cycles(next_corner: np.ndarray, corner: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The corner cracks in ring order (each ring once), and where each ring starts in that order."""
    index = np.full(len(next_corner), -1, np.int64)
    index[corner] = np.arange(len(corner))
    link = index[next_corner[corner]].tolist()
    seen = bytearray(len(link))
    order: list[int] = []
    starts: list[int] = []
    for s in range(len(link)):
        if seen[s]:
            continue
        starts.append(len(order))
        i = s
        while not seen[i]:
            seen[i] = 1
            order.append(i)
            i = link[i]
    return corner[np.array(order, np.int64)], starts


def _finish_rings(mask_of: np.ndarray, cx: np.ndarray, cy: np.ndarray, starts: list[int]):
    """Rings from corners in ring order: split where a ring passes a corner twice, each started at its top-left
    corner, sorted by mask then first corner, closed; with each ring's mask and whether it is an outline."""
    n = len(cx)
    bounds = np.r_[np.array(starts, np.int64), n]
    length = np.diff(bounds)
    ring = np.repeat(np.arange(len(length)), length)
    key = cy * (1 << 31) + cx                                   # row-major order of corners
    # A ring through one corner twice (a diagonal pinch, rare) is split there into simple loops, in Python.
    by_corner = np.lexsort((key, ring))
    twice = (ring[by_corner][1:] == ring[by_corner][:-1]) & (key[by_corner][1:] == key[by_corner][:-1])
    pinched = np.unique(ring[by_corner][1:][twice])
    simple = np.ones(len(length), bool)
    simple[pinched] = False
    # Simple rings: rotated to start at their smallest key (corners of a simple ring are distinct).
    idx = np.flatnonzero(simple[ring])
    rk = ring[idx]
    rstart = np.flatnonzero(np.r_[True, rk[1:] != rk[:-1]]) if len(idx) else np.zeros(0, np.int64)
    rlen = np.diff(np.r_[rstart, len(idx)])
    kk = key[idx]
    first = np.minimum.reduceat(kk, rstart) if len(idx) else kk
    shift = np.flatnonzero(kk == np.repeat(first, rlen)) - rstart
    pos = np.arange(len(idx)) - np.repeat(rstart, rlen)
    pieces = [idx[np.repeat(rstart, rlen) + (pos + np.repeat(shift, rlen)) % np.repeat(rlen, rlen)]]
    lens = [rlen]
    keys = key.tolist() if len(pinched) else []
    for g in pinched.tolist():
        for loop in _split(list(range(bounds[g], bounds[g + 1])), keys):
            pieces.append(np.array(loop, np.int64))
            lens.append(np.array([len(loop)]))
    flat = np.concatenate(pieces)
    lens = np.concatenate(lens)
    begin = np.cumsum(lens) - lens
    # Rings by mask, then by first corner.
    ring_order = np.lexsort((key[flat[begin]], mask_of[flat[begin]]))
    lens, begin = lens[ring_order], begin[ring_order]
    new_begin = np.cumsum(lens) - lens
    flat = flat[np.repeat(begin - new_begin, lens) + np.arange(len(flat))]
    x, y = cx[flat], cy[flat]
    # Shoelace (exact integers) per ring: outlines (set pixels on the left, y down) come out negative.
    nxt = np.arange(len(flat)) + 1
    nxt[new_begin + lens - 1] = new_begin
    area2 = np.add.reduceat(x * y[nxt] - x[nxt] * y, new_begin)
    pts = np.stack([x, y], 1).tolist()
    points = []
    for a, m in zip(new_begin.tolist(), lens.tolist()):
        ring_points = pts[a:a + m]
        ring_points.append(pts[a])
        points.append(ring_points)
    return mask_of[flat[new_begin]], points, area2 < 0


def _split(loop: list[int], key: list[int]) -> list[list[int]]:
    """A ring (corner indices in order) split at every corner it passes twice into simple loops, each rotated to
    start at its smallest key."""
    done, todo = [], [loop]
    while todo:
        ring = todo.pop()
        where: dict[int, int] = {}
        for pos, i in enumerate(ring):
            if key[i] in where:
                a = where[key[i]]
                todo += [ring[a:pos], ring[pos:] + ring[:a]]
                break
            where[key[i]] = pos
        else:
            start = min(range(len(ring)), key=lambda j: key[ring[j]])
            done.append(ring[start:] + ring[:start])
    return done


def _nest(shells: list[list], holes: list[list]) -> list[list]:
    """MultiPolygon coordinates: each hole goes into the smallest outline that holds it (pieces inside holes)."""
    import shapely

    shell_polys = np.array([shapely.Polygon(s) for s in shells])
    hole_points = [shapely.Polygon(h) for h in holes]
    areas = shapely.area(shell_polys)
    parts = [[s] for s in shells]
    for h, hole in enumerate(hole_points):
        inside = np.flatnonzero(shapely.covers(shell_polys, hole))
        parts[int(inside[np.argmin(areas[inside])])].append(holes[h])
    return parts

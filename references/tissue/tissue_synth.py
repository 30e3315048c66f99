"""Synthetic low-resolution slide views (2-16 µm/px) with tissue labels, built from real DSB2018 nuclei images.

No slide-level tissue annotations exist offline, so views are composed: a background (brightfield glass or
fluorescence dark field, with illumination and noise), tissue regions of several shapes (smooth blobs, core
biopsies, fragments, whole sections, mosaics of rectangular microscope fields) filled with real DSB2018
images of the matching modality, downsampled 4-45x with area averaging, and artefacts that must stay
background (dust, debris, fibres, pen marks, air bubbles, haze, the slide-label edge, tears). Folds are
tissue. About 12 % of the views hold no tissue at all.

    from references.tissue.tissue_synth import Sources, make_view
    src = Sources(data_dir, train_ids)                 # loads + pre-downsamples the images once
    view, label, info = make_view(np.random.default_rng(0), src)
    # view: (S, S, C) uint8 / uint16 / float32, C in {1, 3, 2-4}; label: (S, S) uint8 (1 = tissue)
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

LEVELS = tuple(2.0 ** (k / 4) for k in range(8, 23))  # downsampling factors 4 .. 45 (DSB ~0.25-0.5 µm/px)
MODALITIES = {"fluorescence": "fluo", "brightfield_color_histology": "he", "brightfield_gray": "grey"}


def _resize(a: np.ndarray, h: int, w: int, resample=Image.Resampling.BOX) -> np.ndarray:
    """Area-averaging (BOX) or other resize of a float (h, w) or (h, w, C) array."""
    if a.ndim == 3:
        return np.stack([_resize(a[..., c], h, w, resample) for c in range(a.shape[2])], axis=-1)
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), resample), dtype=np.float32)


class Sources:
    """DSB images of one split, per modality, as float32 in [0, 1] pre-downsampled by every factor in LEVELS."""

    def __init__(self, data: Path, ids: list[str]):
        rows = {r["image_id"]: r for r in csv.DictReader(open(Path(data) / "manifest.csv", newline=""))}
        self.levels: dict[str, list[list[np.ndarray]]] = {m: [[] for _ in LEVELS] for m in MODALITIES.values()}
        for image_id in sorted(ids):
            kind = MODALITIES[rows[image_id]["modality_guess"]]
            a = np.asarray(Image.open(Path(data) / "images" / f"{image_id}.png"), dtype=np.float32) / 255.0
            if a.ndim == 3 and kind != "he":
                a = a[..., :3].mean(axis=2)
            elif a.ndim == 3:
                a = a[..., :3]
            elif kind == "he":
                a = np.repeat(a[..., None], 3, axis=2)
            for i, d in enumerate(LEVELS):
                h, w = max(2, round(a.shape[0] / d)), max(2, round(a.shape[1] / d))
                self.levels[kind][i].append(_resize(a, h, w))

    def pick(self, rng, kind: str, level: int) -> np.ndarray:
        imgs = self.levels[kind][level]
        a = imgs[rng.integers(len(imgs))]
        a = np.rot90(a, rng.integers(4)) if rng.random() < 0.5 else a
        return a[::-1] if rng.random() < 0.5 else a


# --- shapes ---------------------------------------------------------------------------------------------

def lowfreq(rng, shape, scale: float) -> np.ndarray:
    """Smooth noise with features ~`scale` px, zero mean, unit sd."""
    h, w = shape
    gh, gw = max(2, int(h / scale) + 3), max(2, int(w / scale) + 3)
    z = _resize(rng.standard_normal((gh, gw)).astype(np.float32), h, w, Image.Resampling.BICUBIC)
    return (z - z.mean()) / (z.std() + 1e-6)


def _draw(shape, fn) -> np.ndarray:
    im = Image.new("L", (shape[1], shape[0]), 0)
    fn(ImageDraw.Draw(im))
    return np.asarray(im) > 0


def blob_polygon(rng, cy, cx, a, b, angle, wobble=0.15, n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 1 + sum(wobble * rng.standard_normal() / k * np.cos(k * t + rng.uniform(0, 6.3)) for k in range(2, 6))
    x, y = a * r * np.cos(t), b * r * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + ca * xi - sa * yi, cy + sa * xi + ca * yi) for xi, yi in zip(x, y)]


def curve(rng, shape, length: float, step: float = 3.0, bend: float = 0.25, start=None):
    h, w = shape
    y, x = start if start is not None else (rng.uniform(0, h), rng.uniform(0, w))
    th = rng.uniform(0, 2 * np.pi)
    pts = [(x, y)]
    for _ in range(max(2, int(length / step))):
        th += rng.normal(0, bend)
        x, y = x + step * math.cos(th), y + step * math.sin(th)
        pts.append((x, y))
    return pts


def tissue_shape(rng, S: int, kind: str) -> np.ndarray:
    shape = (S, S)
    if kind == "blobs":
        scale = rng.uniform(10, 60)
        return lowfreq(rng, shape, scale) > np.quantile(rng.standard_normal(2000), rng.uniform(0.2, 0.9))
    if kind == "section":
        m = lowfreq(rng, shape, rng.uniform(40, 120)) > rng.uniform(-2.5, 0.0)
        return m if rng.random() < 0.6 else m | _draw(shape, lambda d: d.polygon(
            blob_polygon(rng, S / 2 + rng.normal(0, S / 8), S / 2 + rng.normal(0, S / 8), rng.uniform(0.3, 0.7) * S,
                         rng.uniform(0.25, 0.6) * S, rng.uniform(0, 3.14)), fill=1))
    if kind == "cores":  # needle biopsies: long thin wobbly ellipses
        def f(d):
            for _ in range(rng.integers(1, 6)):
                d.polygon(blob_polygon(rng, rng.uniform(0, S), rng.uniform(0, S), rng.uniform(15, 0.6 * S),
                                       rng.uniform(3, 20), rng.uniform(0, 3.14), wobble=0.08, n=64), fill=1)
        return _draw(shape, f)
    if kind == "round":  # TMA cores, round sections
        def f(d):
            for _ in range(rng.integers(1, 5)):
                r = rng.uniform(6, 0.35 * S)
                d.polygon(blob_polygon(rng, rng.uniform(0, S), rng.uniform(0, S), r, r * rng.uniform(0.7, 1.0),
                                       rng.uniform(0, 3.14)), fill=1)
        return _draw(shape, f)
    if kind == "fragments":
        def f(d):
            for _ in range(rng.integers(3, 40)):
                r = rng.uniform(1.5, 9)
                d.polygon(blob_polygon(rng, rng.uniform(0, S), rng.uniform(0, S), r, r * rng.uniform(0.4, 1.0),
                                       rng.uniform(0, 3.14), wobble=0.3, n=16), fill=1)
        return _draw(shape, f)
    raise ValueError(kind)


# --- texture ---------------------------------------------------------------------------------------------

def texture_grid(rng, src: Sources, kind: str, level: int, S: int) -> np.ndarray:
    """The view covered with abutting random crops (one cell per crop, brick offsets) of one modality."""
    cell = max(2, int(round(256 / LEVELS[level])))
    out = np.zeros((S, S, 3 if kind == "he" else 1), np.float32)
    for r in range(-int(rng.integers(cell)), S, cell):
        for c in range(-int(rng.integers(cell)), S, cell):
            a = src.pick(rng, kind, level)
            y, x = rng.integers(a.shape[0] - cell + 1), rng.integers(a.shape[1] - cell + 1)
            crop = a[y:y + cell, x:x + cell]
            crop = (crop if crop.ndim == 3 else crop[..., None]) * _gain(rng, kind)
            r0, c0 = max(r, 0), max(c, 0)
            out[r0:r + cell, c0:c + cell] = crop[r0 - r:, c0 - c:][:S - r0, :S - c0]
    return out


def _gain(rng, kind):
    return rng.uniform(0.75, 1.25) if kind == "fluo" else 1.0


def stroma_od(rng, S: int) -> np.ndarray:
    """Optical density (S, S, 3) of H&E stroma: eosin of varying density, sparse nuclei, sometimes fat
    (empty cells ~5-15 px with thin pink walls). DSB crops are nucleus-dense; whole slides are not."""
    eosin = np.array([0.05, 0.45, 0.15]) * rng.uniform(0.3, 1.5)
    haem = np.array([0.55, 0.6, 0.25]) * rng.uniform(0.5, 1.5)
    dens = np.clip(0.7 + rng.uniform(0.1, 0.4) * lowfreq(rng, (S, S), rng.uniform(2, 8)), 0.05, None)
    if rng.random() < 0.35:  # adipose: a mesh of thin walls (Voronoi edges) over part of the region
        from scipy.spatial import cKDTree
        pts = rng.uniform(0, S, (int(S * S / rng.uniform(30, 200)), 2))
        grid = np.stack(np.mgrid[:S, :S], -1).reshape(-1, 2)
        d, _ = cKDTree(pts).query(grid, k=2)
        walls = ((d[:, 1] - d[:, 0]) < rng.uniform(0.6, 1.5)).reshape(S, S)
        fat = lowfreq(rng, (S, S), rng.uniform(20, 60)) > rng.uniform(-1, 1)
        dens = np.where(fat, walls * 0.8, dens)
    nuclei = ndi.gaussian_filter((rng.random((S, S)) < rng.uniform(0.005, 0.12)).astype(np.float32), 0.6) * rng.uniform(0.8, 2.5)
    return dens[..., None] * eosin + nuclei[..., None] * haem


def texture_mosaic(rng, src: Sources, kind: str, level: int, S: int, fill: float):
    """Whole downsampled images packed in shelves with gaps (like a mosaic of microscope fields)."""
    chans = 3 if kind == "he" else 1
    out = np.zeros((S, S, chans), np.float32)
    mask = np.zeros((S, S), bool)
    gap_max = rng.choice([0, 1, 3, 8, 20])
    y = int(rng.integers(-S // 4, S // 4))
    while y < S:
        x, row_h = int(rng.integers(-S // 4, S // 4)), 0
        while x < S:
            a = src.pick(rng, kind, level)
            h, w = a.shape[:2]
            if rng.random() < fill:
                ys, xs = slice(max(y, 0), min(y + h, S)), slice(max(x, 0), min(x + w, S))
                if ys.start < ys.stop and xs.start < xs.stop:
                    piece = a[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x]
                    out[ys, xs] = (piece if piece.ndim == 3 else piece[..., None]) * _gain(rng, kind)
                    mask[ys, xs] = True
            x += w + int(rng.integers(0, gap_max + 1))
            row_h = max(row_h, h)
        y += row_h + int(rng.integers(0, gap_max + 1))
    return out, mask


# --- backgrounds and artefacts -----------------------------------------------------------------------------

def illumination(rng, S, amp):
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    cy, cx = rng.uniform(-0.3, 1.3, 2)
    vign = ((yy - cy) ** 2 + (xx - cx) ** 2)
    g = rng.normal(0, 1, 2)
    field = -rng.uniform(0, 1) * vign / max(vign.max(), 1e-6) + 0.3 * (g[0] * (yy - 0.5) + g[1] * (xx - 0.5))
    field += 0.3 * rng.uniform(0, 1) * lowfreq(rng, (S, S), rng.uniform(40, 200))
    field -= field.mean()
    return amp * field / (np.abs(field).max() + 1e-6)


def bf_artefacts(rng, img, S, info):
    """Artefacts on brightfield (transmittance image, (S, S, 3)); all are background unless on tissue."""
    n_dust = rng.integers(0, 40) if rng.random() < 0.7 else 0
    for _ in range(n_dust):  # dust and debris: small dark, colourless or brownish spots
        r = rng.uniform(0.4, 3.5) if rng.random() < 0.85 else rng.uniform(3, 8)
        cy, cx = rng.uniform(0, S, 2)
        m = _draw((S, S), lambda d: d.polygon(blob_polygon(rng, cy, cx, r, r * rng.uniform(0.3, 1), rng.uniform(0, 3.1),
                                                            wobble=0.4, n=12), fill=1))
        col = rng.uniform(0.05, 0.75) * (np.array([1.0, 0.85, 0.7]) if rng.random() < 0.3 else 1.0)
        img[m] = img[m] * col
    for _ in range(rng.integers(0, 3) if rng.random() < 0.25 else 0):  # fibres / hairs
        pts = curve(rng, (S, S), rng.uniform(10, 80), bend=0.2)
        m = _draw((S, S), lambda d: d.line(pts, fill=1, width=1))
        img[m] *= rng.uniform(0.3, 0.8)
    if rng.random() < 0.25:  # pen marks: broad semi-transparent coloured strokes
        ink = [np.array([0.25, 0.35, 0.85]), np.array([0.2, 0.6, 0.3]), np.array([0.15, 0.15, 0.15]),
               np.array([0.85, 0.2, 0.25])][rng.integers(4)]
        for _ in range(rng.integers(1, 4)):
            pts = curve(rng, (S, S), rng.uniform(30, 300), step=4, bend=0.15)
            m = _draw((S, S), lambda d: d.line(pts, fill=1, width=int(rng.uniform(2, 40)), joint="curve"))
            a = np.clip(rng.uniform(0.4, 0.95) + 0.04 * lowfreq(rng, (S, S), 8), 0, 1)[m][:, None]
            img[m] = img[m] * (1 - a + a * ink * rng.uniform(0.6, 1.1))
        info["pen"] = True
    for _ in range(rng.integers(1, 5) if rng.random() < 0.2 else 0):  # air bubbles: ring outlines
        r, cy, cx = rng.uniform(4, 50), rng.uniform(0, S), rng.uniform(0, S)
        m = _draw((S, S), lambda d: d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=1, width=int(rng.integers(1, 4))))
        img[m] *= rng.uniform(0.45, 0.9)
    if rng.random() < 0.2:  # out-of-focus haze: a smooth grey smudge
        img *= 1 - rng.uniform(0.03, 0.2) * np.clip(lowfreq(rng, (S, S), rng.uniform(30, 100)) - 0.5, 0, None)[..., None]
    if rng.random() < 0.15:  # the slide-label edge: a band along one side
        w = int(rng.uniform(4, 0.3 * S))
        band = np.zeros((S, S), bool)
        band[:w] = True
        band = np.rot90(band, rng.integers(4))
        col = [rng.uniform(1.0, 1.1) * np.ones(3), rng.uniform(0.15, 0.5) * np.ones(3),
               rng.uniform(0.6, 1.0, 3)][rng.integers(3)]
        img[band] = col * (1 + 0.05 * rng.standard_normal((band.sum(), 1)))
        if rng.random() < 0.6:
            text = (lowfreq(rng, (S, S), 2) > 1.2) & band
            img[text] *= 0.3
        edge = band ^ ndi.binary_erosion(band, iterations=1, border_value=1)
        img[edge] *= 0.4
    return img


def fluo_artefacts(rng, img, S, info):
    """Artefacts on a fluorescence field ((S, S) intensity): bright specks, fibres, haze, bubbles, edge."""
    for _ in range(rng.integers(0, 12) if rng.random() < 0.6 else 0):  # isolated bright dust specks
        y, x = rng.integers(0, S, 2)
        r = 1 if rng.random() < 0.7 else 2
        img[y:y + r, x:x + r] += rng.uniform(0.05, 0.8)
    for _ in range(rng.integers(1, 3) if rng.random() < 0.15 else 0):  # lint fibres
        pts = curve(rng, (S, S), rng.uniform(10, 80), bend=0.2)
        m = _draw((S, S), lambda d: d.line(pts, fill=1, width=1))
        img[m] += rng.uniform(0.03, 0.4)
    if rng.random() < 0.25:  # out-of-focus glow / haze
        img += rng.uniform(0.01, 0.08) * np.clip(lowfreq(rng, (S, S), rng.uniform(20, 100)), 0, None)
    for _ in range(rng.integers(1, 3) if rng.random() < 0.1 else 0):  # bubbles: faint rings
        r, cy, cx = rng.uniform(4, 50), rng.uniform(0, S), rng.uniform(0, S)
        m = _draw((S, S), lambda d: d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=1, width=int(rng.integers(1, 3))))
        img[m] += rng.uniform(0.01, 0.08)
    if rng.random() < 0.1:  # slide / label edge
        w = int(rng.uniform(4, 0.3 * S))
        band = np.zeros((S, S), bool)
        band[:w] = True
        band = np.rot90(band, rng.integers(4))
        img[band] = rng.uniform(0.0, 0.5) + 0.01 * rng.standard_normal(band.sum())
    return img


def to_native(rng, x: np.ndarray, fluo: bool) -> np.ndarray:
    """Intensity (uint8 scale = 1.0) -> uint8 (60 %), uint16 (33 %, 12-16 bit, offsets) or float32 (7 %)."""
    u = rng.random()
    if u < 0.6:
        return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    if u < 0.93:
        full = rng.choice([4095.0, 16383.0, 65535.0]) * (rng.uniform(0.3, 1.0) if fluo else 1.0)
        off = rng.choice([0.0, 100.0, 500.0]) if fluo else 0.0
        return np.clip(np.rint(off + x * full), 0, 65535).astype(np.uint16)
    return (np.clip(x, 0, None) * rng.choice([1.0, 255.0])).astype(np.float32)


# --- views -------------------------------------------------------------------------------------------------

SHAPES = ("none", "blobs", "section", "cores", "round", "fragments", "mosaic")
SHAPE_P = (0.12, 0.18, 0.14, 0.12, 0.1, 0.09, 0.25)


def make_view(rng, src: Sources, S: int = 224, modality: str | None = None, shape: str | None = None):
    """One synthetic view: (native (S, S, C) array, uint8 label (S, S), info dict)."""
    modality = modality or ("bf" if rng.random() < 0.5 else "fluo")
    shape = shape or rng.choice(SHAPES, p=SHAPE_P)
    level = int(rng.integers(len(LEVELS)))
    info = {"modality": modality, "shape": str(shape), "um_per_px": 0.375 * LEVELS[level]}
    kind = "fluo" if modality == "fluo" else ("grey" if rng.random() < 0.12 else "he")
    if shape == "mosaic":
        tex, tissue = texture_mosaic(rng, src, kind, level, S, fill=rng.uniform(0.3, 1.0))
    elif shape == "none":
        tex, tissue = None, np.zeros((S, S), bool)
    else:
        tex, tissue = texture_grid(rng, src, kind, level, S), tissue_shape(rng, S, shape)
        if rng.random() < 0.3 and shape in ("blobs", "section", "round"):  # tears: thin gaps (background)
            for _ in range(rng.integers(1, 4)):
                pts = curve(rng, (S, S), rng.uniform(20, 200), bend=0.3)
                tissue &= ~_draw((S, S), lambda d: d.line(pts, fill=1, width=int(rng.integers(1, 3))))
    alpha = ndi.gaussian_filter(tissue.astype(np.float32), 0.5) * tissue if rng.random() < 0.5 else tissue.astype(np.float32)
    fold = None
    if tex is not None and rng.random() < 0.25 and tissue.mean() > 0.05:  # folds: a darker/brighter band, tissue
        pts = curve(rng, (S, S), rng.uniform(20, 150), bend=0.15)
        fold = _draw((S, S), lambda d: d.line(pts, fill=1, width=int(rng.integers(2, 8)))) & tissue

    if modality == "bf":
        glass = rng.uniform(0.78, 0.98) * (1 + rng.normal(0, 0.015, 3))
        light = 1 + illumination(rng, S, rng.uniform(0, 0.12))
        img = np.clip(glass, 0, 1)[None, None, :] * light[..., None]
        if tex is not None:
            if tex.shape[2] == 1:
                tex = np.repeat(tex, 3, axis=2)
            white = np.quantile(tex, 0.99) + 1e-3
            od = -np.log(np.clip(tex / white, 1e-3, 1.0)) * rng.uniform(0.5, 1.5)
            if kind == "he" and shape != "mosaic" and rng.random() < 0.4:  # regions of stroma / fat
                mix = lowfreq(rng, (S, S), rng.uniform(15, 60)) > rng.uniform(-1.5, 1.0)
                od = np.where(mix[..., None], stroma_od(rng, S), od)
            if fold is not None:
                od[fold] *= rng.uniform(1.5, 2.5)
            trans = np.exp(-od)
            img = img * (1 - alpha[..., None] + alpha[..., None] * trans)
        img = bf_artefacts(rng, img, S, info)
        sigma = rng.uniform(0.002, 0.015)
        img = img + rng.normal(0, 1, img.shape).astype(np.float32) * (sigma * np.sqrt(np.clip(img, 0.05, 1)))
        if kind == "grey" or rng.random() < 0.15:
            img = img.mean(axis=2, keepdims=True)
        native = to_native(rng, img, fluo=False)
    else:
        level0 = rng.uniform(0.0, 0.1) if rng.random() < 0.8 else rng.uniform(0.1, 0.2)
        img = level0 + illumination(rng, S, rng.uniform(0, 0.04))
        if tex is not None:
            t = tex[..., 0] * rng.uniform(0.4, 1.6) * (rng.uniform(0.2, 0.5) if rng.random() < 0.15 else 1.0)
            if rng.random() < 0.4:
                t = t + rng.uniform(0.005, 0.06) * (1 + 0.3 * lowfreq(rng, (S, S), 10))  # autofluorescence lift
            if fold is not None:
                t[fold] *= rng.uniform(1.3, 2.0)
            img = img * (1 - alpha) + alpha * (t if rng.random() < 0.5 else img + t)
        img = fluo_artefacts(rng, np.clip(img, 0, None), S, info)
        sigma = rng.uniform(0.0, 0.012)
        img = img + rng.normal(0, 1, img.shape).astype(np.float32) * (sigma + 0.01 * np.sqrt(np.clip(img, 0, 1)) * rng.random())
        img = np.clip(img, 0, None)[..., None]
        u = rng.random()
        if u < 0.12:  # multichannel: nuclei + a cytoplasm-like or empty channel, in random order
            others = [np.clip(ndi.gaussian_filter(img[..., 0], rng.uniform(1, 3)) * rng.uniform(0.5, 2), 0, None)
                      if rng.random() < 0.5 else np.abs(rng.normal(level0, 0.01, (S, S))) for _ in range(rng.integers(1, 4))]
            chans = [img[..., 0]] + [o.astype(np.float32) for o in others]
            img = np.stack([chans[i] for i in rng.permutation(len(chans))], axis=-1)
            info["channels"] = len(chans)
        elif u < 0.25:  # rendered as RGB (e.g. DAPI shown blue)
            tint = rng.dirichlet(np.ones(3)) if rng.random() < 0.5 else np.array([0.1, 0.2, 1.0])
            img = img * (tint / tint.max())[None, None, :]
        native = to_native(rng, img, fluo=True)
    return native, tissue.astype(np.uint8), info

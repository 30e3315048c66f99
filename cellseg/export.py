"""Everything that writes result files, with memory flat in the slide size.

Conventions (DESIGN.md §3): coordinates are (row, col) in level-0 pixels, boxes half-open
`Box(row0, col0, row1, col1)`. `x, y` appear only where a file format demands them (COCO bbox).

- `LabelStore`: a disk-backed uint32 label canvas (zstd-compressed chunk files) the size of the slide, painted tile by tile.
- `write_labels_ome_tiff`: the store as a tiled, pyramidal, deflate-compressed OME-TIFF, tile by tile.
- `Panoptic`, `write_label_images`: the same pyramid also as panoptic.ome.tif (tissue/background "stuff" and the
  cell "things" in one label image; encoding in `Panoptic`).
- `write_overlay_png`, `write_area_histogram`: the two pictures.
- `CellsTableWriter`: streaming writer for cells.csv.
- `CocoWriter`, `crop_rle`: the COCO instance JSON writer and its mask RLE live in `cellseg.coco`;
  re-exported here so `from cellseg.export import CocoWriter, crop_rle` keeps working.
"""

from __future__ import annotations

import csv
import logging
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from .coco import CocoWriter, crop_rle  # noqa: F401 (re-exported: pipeline.py and tests import them from here)
from .errors import ParameterError
from .tiling import Box

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- label canvas

def _chunks_under(start: int, stop: int, chunk: int) -> range:
    """Indices of the chunks of size `chunk` that pixels start..stop-1 fall in."""
    return range(start // chunk, (stop - 1) // chunk + 1)


class _ChunkFiles:
    """A 2-D uint32 array on disk, one zstd-compressed file per `chunk` x `chunk` block; blocks never written are 0.

    A scratch format private to one run. zarr did this job first, but every call through zarr 3's asyncio bridge
    cost 1.2 ms to read and ~5 ms to write a chunk, against 0.3-0.6 ms to compress or decompress a label chunk:
    that overhead was most of the label-writing time of a big slide. Not thread-safe (one writer at a time).
    """

    def __init__(self, folder: Path, height: int, width: int, chunk: int):
        self.folder, self.shape, self.chunk = Path(folder), (int(height), int(width)), int(chunk)
        shutil.rmtree(self.folder, ignore_errors=True)   # the folder belongs to this store
        self.folder.mkdir(parents=True)
        self.written: set[tuple[int, int]] = set()      # blocks on disk; the rest are 0

    def _path(self, i: int, j: int) -> Path:
        return self.folder / f"{i}.{j}.zst"

    def block_shape(self, i: int, j: int) -> tuple[int, int]:
        c = self.chunk
        return min(c, self.shape[0] - i * c), min(c, self.shape[1] - j * c)

    def load(self, i: int, j: int) -> np.ndarray:
        """Block (i, j), decoded (a fresh, writable array)."""
        if (i, j) not in self.written:
            return np.zeros(self.block_shape(i, j), np.uint32)
        return self._decoded(i, j).astype(np.uint32)   # a copy, in native byte order

    def _decoded(self, i: int, j: int) -> np.ndarray:
        """Written block (i, j) as a read-only view of its decoded bytes (no copy: reads slice it straight away)."""
        from imagecodecs import zstd_decode
        raw = zstd_decode(self._path(i, j).read_bytes())
        return np.frombuffer(raw, "<u4").reshape(self.block_shape(i, j))

    def store(self, i: int, j: int, block: np.ndarray) -> None:
        """Block (i, j) := `block` (its full shape); an all-zero block takes no disk."""
        from imagecodecs import zstd_encode
        if block.shape != self.block_shape(i, j):
            raise ValueError(f"expected block ({i}, {j}) of shape {self.block_shape(i, j)}, got {block.shape}")
        if not block.any():
            if (i, j) in self.written:
                self._path(i, j).unlink()
                self.written.discard((i, j))
            return
        self._path(i, j).write_bytes(zstd_encode(np.ascontiguousarray(block, "<u4"), level=1))
        self.written.add((i, j))

    def read(self, row0: int, row1: int, col0: int, col1: int, step: int = 1) -> np.ndarray:
        """uint32 self[row0:row1:step, col0:col1:step] (ends clipped to the array), decoding only the blocks with
        a sampled pixel."""
        row1, col1 = min(row1, self.shape[0]), min(col1, self.shape[1])
        out = np.zeros((max(0, -(-(row1 - row0) // step)), max(0, -(-(col1 - col0) // step))), np.uint32)
        c = self.chunk
        for i in _chunks_under(row0, row1, c):
            first_r = row0 + -(-(max(row0, i * c) - row0) // step) * step    # first sampled row in block row i
            if first_r >= min(row1, (i + 1) * c):
                continue
            for j in _chunks_under(col0, col1, c):
                first_c = col0 + -(-(max(col0, j * c) - col0) // step) * step
                if first_c >= min(col1, (j + 1) * c) or (i, j) not in self.written:
                    continue
                part = self._decoded(i, j)[first_r - i * c:min(row1, (i + 1) * c) - i * c:step,
                                       first_c - j * c:min(col1, (j + 1) * c) - j * c:step]
                r, k = (first_r - row0) // step, (first_c - col0) // step
                out[r:r + part.shape[0], k:k + part.shape[1]] = part
        return out


class LabelStore:
    """Disk-backed uint32 instance-label canvas of shape (height, width) in level-0 pixels.

    Blocks of `chunk` x `chunk` px, zstd-compressed, one file each in `folder` (_ChunkFiles), fill 0.
    Chunks that stay all zero are never written, so background costs no disk. `folder` belongs to
    the store: anything already there is replaced (pass a fresh folder, e.g. inside the staging
    folder, never a user's folder). Lives for one run:
    the caller removes it with `remove()` (or by deleting its parent folder). Never holds the slide
    in memory: every method touches a bounded number of chunks at a time.

    Painting goes through a write-back cache of decoded chunks (at most `cache_bytes`, least recently painted
    evicted first): tiles overlap by their halos, so a chunk is painted by up to nine tiles, and compressing it
    to disk after each of them cost ~12 ms a tile (~3 s on an 8192² slide). Reads flush the cache first.
    """

    def __init__(self, folder: Path, height: int, width: int, chunk: int = 512, cache_bytes: int = 64 << 20):
        if height <= 0 or width <= 0:
            raise ParameterError(f"expected a label canvas of positive size, got {height} x {width} px")
        if chunk <= 0:
            raise ParameterError(f"expected a positive chunk size, got {chunk}")
        self.folder = Path(folder)
        self.chunk = int(chunk)
        self._blocks = _ChunkFiles(self.folder, height, width, self.chunk)
        # (chunk row, chunk col) of every chunk ever painted: the rest is known to be 0 without reading it
        self.written_chunks: set[tuple[int, int]] = set()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()   # decoded chunks not yet on disk
        self._cache_chunks = max(1, cache_bytes // (self.chunk * self.chunk * 4))

    @property
    def height(self) -> int:
        return self._blocks.shape[0]

    @property
    def width(self) -> int:
        return self._blocks.shape[1]

    def _check_box(self, box: Box) -> None:
        if not (0 <= box.row0 <= box.row1 <= self.height and 0 <= box.col0 <= box.col1 <= self.width):
            raise ValueError(f"expected a box inside the {self.height} x {self.width} canvas, got {box}")

    def paint(self, box: Box, labels: np.ndarray) -> None:
        """Write the NONZERO pixels of `labels` (uint32, shape box.shape) into `box`; keep the rest.

        Only the chunks under the bounding box of the nonzero pixels are touched, so painting a tile whose
        cells sit in one corner touches one chunk, not the tile's four.
        """
        box = Box(*box)
        self._check_box(box)
        labels = np.asarray(labels)
        if labels.shape != box.shape:
            raise ValueError(f"expected labels of shape {box.shape} for {box}, got {labels.shape}")
        if labels.dtype != np.uint32:
            raise ValueError(f"expected uint32 labels, got {labels.dtype}")
        rows = np.flatnonzero(labels.any(axis=1))
        if rows.size == 0:
            return
        cols = np.flatnonzero(labels.any(axis=0))
        top, bottom = box.row0 + int(rows[0]), box.row0 + int(rows[-1]) + 1
        left, right = box.col0 + int(cols[0]), box.col0 + int(cols[-1]) + 1
        c = self.chunk
        for i in _chunks_under(top, bottom, c):
            for j in _chunks_under(left, right, c):
                chunk = self._cached_chunk(i, j)
                r0, r1 = max(top, i * c), min(bottom, (i + 1) * c)
                c0, c1 = max(left, j * c), min(right, (j + 1) * c)
                sub = labels[r0 - box.row0:r1 - box.row0, c0 - box.col0:c1 - box.col0]
                np.copyto(chunk[r0 - i * c:r1 - i * c, c0 - j * c:c1 - j * c], sub, where=sub != 0)
                self.written_chunks.add((i, j))

    def _cached_chunk(self, i: int, j: int) -> np.ndarray:
        """Chunk (i, j) decoded, in the cache and most recently used; the least recently used goes to disk."""
        key = (i, j)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        chunk = self._blocks.load(i, j)
        self._cache[key] = chunk
        while len(self._cache) > self._cache_chunks:
            self._store_chunk(*self._cache.popitem(last=False))
        return chunk

    def _store_chunk(self, key: tuple[int, int], chunk: np.ndarray) -> None:
        self._blocks.store(*key, chunk)

    def flush(self) -> None:
        """Write every cached chunk to disk (reads do this first)."""
        while self._cache:
            self._store_chunk(*self._cache.popitem(last=False))

    def read(self, box: Box, step: int = 1) -> np.ndarray:
        """uint32 labels of `box`, every `step`-th row and column from its top-left corner.

        Shape (ceil(box.height / step), ceil(box.width / step)); step > 1 is a nearest-neighbour
        downsample (labels are never interpolated).
        """
        box = Box(*box)
        self._check_box(box)
        self.flush()
        return self._blocks.read(box.row0, box.row1, box.col0, box.col1, step)

    def thumbnail(self, factor: int) -> np.ndarray:
        """uint32 (ceil(height / factor), ceil(width / factor)): pixel [i, j] = canvas[i*factor, j*factor].

        Read one band of chunk rows at a time, so memory is one band of the thumbnail plus one decoded chunk.
        """
        if factor < 1:
            raise ParameterError(f"expected a thumbnail factor >= 1, got {factor}")
        self.flush()
        out = np.zeros((-(-self.height // factor), -(-self.width // factor)), np.uint32)
        for b0 in range(0, self.height, self.chunk):
            b1 = min(b0 + self.chunk, self.height)
            first = -(-b0 // factor) * factor  # first sampled row inside this band
            if first >= b1:
                continue  # factor > chunk: this band holds no sampled row
            band = self._blocks.read(first, b1, 0, self.width, factor)
            out[first // factor:first // factor + band.shape[0]] = band
        return out

    def remove(self) -> None:
        """Delete the store's folder (the end of its one-run lifetime)."""
        self._cache.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


# --------------------------------------------------------------------------- OME-TIFF

@dataclass(frozen=True)
class _Constant:
    """A block whose every pixel is `value`, not materialised: most of a whole slide's label and panoptic tiles are
    glass (0) or tissue without cells, and making, encoding and checking 1 MB arrays for them was most of the
    write time of a big slide."""

    value: int
    shape: tuple[int, int]

    def materialise(self) -> np.ndarray:
        return np.full(self.shape, self.value, np.uint32)


class _SparseLevel:
    """One pyramid level (_ChunkFiles): a region that touches none of its written chunks is a _Constant 0 without
    reading anything. On a whole slide most regions are glass, never written."""

    def __init__(self, blocks: _ChunkFiles):
        self.blocks, self.chunk, self.shape = blocks, blocks.chunk, blocks.shape

    def read(self, row0: int, row1: int, col0: int, col1: int, step: int = 1) -> np.ndarray | _Constant:
        """uint32 self[row0:row1:step, col0:col1:step] (ends clipped to the level); _Constant(0) where nothing
        was ever written."""
        row1, col1 = min(row1, self.shape[0]), min(col1, self.shape[1])
        c = self.chunk
        if any((i, j) in self.blocks.written for i in _chunks_under(row0, row1, c) for j in _chunks_under(col0, col1, c)):
            return self.blocks.read(row0, row1, col0, col1, step)
        return _Constant(0, (-(-(row1 - row0) // step), -(-(col1 - col0) // step)))


def _pyramid(store: LabelStore, tile: int) -> list[_SparseLevel]:
    """Levels [level0, level1, ...], level k = level0[::2**k, ::2**k], until the longer side <= tile.

    Levels >= 1 are built as temporary chunk files inside the store's folder, each from the previous level by striding
    one output chunk at a time: the whole pyramid costs ~4/3 of one read of the slide, where striding
    level 0 directly for every level would decode the full slide once per level.
    """
    store.flush()
    levels = [_SparseLevel(store._blocks)]
    h, w = store.height, store.width
    c = store.chunk
    while max(h, w) > tile:
        prev = levels[-1]
        h, w = -(-h // 2), -(-w // 2)
        blocks = _ChunkFiles(store.folder / f"_level{len(levels)}", h, w, c)
        for r in range(0, h, c):
            for col in range(0, w, c):
                block = prev.read(2 * r, 2 * (r + c), 2 * col, 2 * (col + c), step=2)
                if not isinstance(block, _Constant):   # zero chunks stay unwritten (store skips them)
                    blocks.store(r // c, col // c, block)
        levels.append(_SparseLevel(blocks))
    return levels


class Panoptic:
    """How panoptic.ome.tif encodes stuff and things in one uint32 label image:

        value = semantic * label_divisor + instance

    semantic 0 = background (no tissue), 1 = tissue (stuff, instance 0), 2, 3, ... = cell class 1, 2, ...
    (things; instance = the cell's id in cells.csv and labels.ome.tif). label_divisor is the smallest power of
    ten above the largest cell id, at least 1000; summary.json "panoptic" records it and the names.

    tissue: anything with `.at(rows, cols) -> bool (len(rows), len(cols))` in level-0 px (a TissueMask).
    semantic_of_cell: uint32 array indexed by cell id (index 0 unused) -> semantic id (class id + 1).
    """

    def __init__(self, tissue, semantic_of_cell: np.ndarray, class_names: list[str]):
        self.tissue = tissue
        self.semantic_of_cell = np.asarray(semantic_of_cell, np.uint32)
        self.class_names = list(class_names)
        n_cells = len(self.semantic_of_cell) - 1
        self.label_divisor = max(1000, 10 ** len(str(n_cells)))
        self._constant_tissue = getattr(tissue, "constant", None)   # TissueMask.constant: optional shortcut
        if (len(self.class_names) + 2) * self.label_divisor > 2 ** 32:
            raise ParameterError(f"expected at most {2 ** 32 // (len(self.class_names) + 2) - 1} cells for a uint32 "
                                 f"panoptic image, got {n_cells}")

    def describe(self) -> dict:
        semantic = {0: "background", 1: "tissue", **{k + 2: n for k, n in enumerate(self.class_names)}}
        return {"file": "panoptic.ome.tif", "encoding": "value = semantic * label_divisor + instance",
                "label_divisor": self.label_divisor, "semantic": {str(k): v for k, v in semantic.items()},
                "things": [str(k + 2) for k in range(len(self.class_names))], "stuff": ["0", "1"]}

    def encode(self, labels: np.ndarray | _Constant, row0: int, col0: int, step: int) -> np.ndarray | _Constant:
        """Panoptic values for a block of instance labels whose [i, j] is level-0 pixel (row0 + i*step, col0 + j*step)."""
        if isinstance(labels, _Constant):   # no cells here (only ever 0): constant where the tissue is
            rows = row0 + np.array([0, labels.shape[0] - 1]) * step
            cols = col0 + np.array([0, labels.shape[1] - 1]) * step
            tissue = self._constant_tissue(rows, cols) if self._constant_tissue else None
            if tissue is not None:
                return _Constant(int(tissue) * self.label_divisor, labels.shape)
            labels = labels.materialise()
        rows = row0 + np.arange(labels.shape[0]) * step
        cols = col0 + np.arange(labels.shape[1]) * step
        out = self.tissue.at(rows, cols).astype(np.uint32) * np.uint32(self.label_divisor)
        cells = labels > 0
        ids = labels[cells]
        out[cells] = self.semantic_of_cell[ids] * np.uint32(self.label_divisor) + ids
        return out


def _level_blocks(levels: list[_SparseLevel], tile: int) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """(level k, row0, col0, block) of every TIFF tile of every level, levels in order and each row-major, as the
    files are written; edge blocks are smaller (zero-padded when compressed)."""
    for k, level in enumerate(levels):
        h, w = level.shape
        for r in range(0, h, tile):
            for c in range(0, w, tile):
                yield k, r, c, level.read(r, r + tile, c, c + tile)


def _compressed_tiles(blocks: Iterator[np.ndarray], tile: int, level: int = 6) -> Iterator[bytes]:
    """Each block zero-padded to tile x tile and deflate-compressed, in order, as TIFF tiles (little-endian uint32).

    Most of a whole slide's label tiles are constant (glass: 0; tissue without cells: the panoptic tissue value),
    and deflating a 1 MB tile takes ~2 ms: a constant tile is compressed once and its bytes reused. The other
    tiles are compressed on all cores (libdeflate releases the GIL), a bounded number ahead of the writer.
    libdeflate (imagecodecs, which tifffile uses too) writes the same zlib stream format as Python's zlib at
    2.7x its speed and ~5 % fewer bytes on label tiles.
    """
    import os
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    from imagecodecs import deflate_encode

    def compress(block: np.ndarray) -> bytes:
        if block.shape != (tile, tile):
            padded = np.zeros((tile, tile), np.uint32)
            padded[:block.shape[0], :block.shape[1]] = block
            block = padded
        return deflate_encode(np.ascontiguousarray(block, dtype="<u4"), level=level)

    constant: dict[tuple, bytes] = {}
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="cellseg-deflate") as pool:
        pending: deque[Future] = deque()
        for block in blocks:
            if isinstance(block, _Constant):
                key = (block.value, block.shape)
                block = block if key in constant else block.materialise()
            else:
                first = block.flat[0] if block.size else 0
                key = (int(first), block.shape) if block.size and not (block != first).any() else None
            if key is not None:
                if key not in constant:
                    constant[key] = compress(block)
                done: Future = Future()
                done.set_result(constant[key])
                pending.append(done)
            else:
                pending.append(pool.submit(compress, block))
            while len(pending) > 2 * workers or (pending and pending[0].done()):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_labels_ome_tiff(store: LabelStore, path: Path, mpp: float | None, tile: int = 512) -> None:
    """Write the label canvas as a uint32 tiled pyramidal OME-TIFF (BigTIFF) at `path`.

    Level 0 is the full canvas; SubIFD level k is level0[::2**k, ::2**k] (nearest, never
    interpolated) until the longer side <= `tile`. Tiles `tile` x `tile` (a multiple of 16),
    deflate-compressed. OME metadata: axes YX, PhysicalSizeX/Y = `mpp` in µm when known (and the
    TIFF resolution tags to match). Tiles are streamed from the store; peak memory is a few tiles.
    """
    write_label_images(store, {path: None}, mpp, tile)


def write_label_images(store: LabelStore, targets: dict[Path, Panoptic | None], mpp: float | None,
                       tile: int = 512) -> None:
    """Write the label canvas to each path of `targets` as in write_labels_ome_tiff: as is (None) or through a
    Panoptic encoding. The pyramid is built once, and each of its blocks read once, for all of them."""
    if tile <= 0 or tile % 16:
        raise ParameterError(f"expected a TIFF tile size that is a positive multiple of 16, got {tile}")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ParameterError(f"expected a positive pixel size in µm/px, got {mpp}")
    levels = _pyramid(store, tile)
    try:
        _write_pyramids_together(levels, targets, mpp, tile)
    finally:
        for k in range(1, len(levels)):
            shutil.rmtree(store.folder / f"_level{k}", ignore_errors=True)


def _write_pyramids_together(levels: list, targets: dict[Path, Panoptic | None], mpp: float | None,
                             tile: int) -> None:
    """One writer thread per file, all fed from a single read of the pyramid (reading a block costs more
    than encoding and deflating it), through small queues so memory stays a few blocks per file."""
    import queue
    import threading

    end = object()
    queues = [queue.Queue(maxsize=8) for _ in targets]
    failures: list[BaseException] = []

    def blocks_from(q: queue.Queue) -> Iterator[tuple[int, int, int, np.ndarray]]:
        while (item := q.get()) is not end:
            yield item

    def write(path: Path, encode: Panoptic | None, q: queue.Queue) -> None:
        try:
            _write_pyramid(levels, path, mpp, tile, encode, blocks_from(q))
        except BaseException as e:   # re-raised in the caller's thread below
            failures.append(e)

    def put(q: queue.Queue, writer: threading.Thread, item) -> None:
        """Hand `item` to `writer`, unless it has ended, or a writer failed and `item` is a block (then only the
        end marker still goes out, so no writer is left waiting)."""
        while writer.is_alive() and (item is end or not failures):
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    threads = [threading.Thread(target=write, args=(path, encode, q), name=f"cellseg-write-{path.name}")
               for (path, encode), q in zip(targets.items(), queues)]
    for t in threads:
        t.start()
    try:
        for item in _level_blocks(levels, tile):
            for q, t in zip(queues, threads):
                put(q, t, item)
            if failures:
                break
    finally:
        for q, t in zip(queues, threads):
            put(q, t, end)
        for t in threads:
            t.join()
    if failures:
        raise failures[0]


def _write_pyramid(levels: list, path: Path, mpp: float | None, tile: int, encode: Panoptic | None,
                   blocks: Iterator[tuple[int, int, int, np.ndarray]]) -> None:
    """One pyramidal OME-TIFF from `blocks` (_level_blocks order), through `encode` when given."""
    import tifffile
    from itertools import islice
    metadata: dict = {"axes": "YX"}
    if mpp is not None:
        metadata.update(PhysicalSizeX=float(mpp), PhysicalSizeXUnit="µm",
                        PhysicalSizeY=float(mpp), PhysicalSizeYUnit="µm")
    # Tiles go to tifffile already deflate-compressed (_compressed_tiles): the same bytes tifffile would write.
    options = dict(dtype=np.uint32, tile=(tile, tile), compression="zlib", photometric="minisblack")
    with tifffile.TiffWriter(path, bigtiff=True, ome=True, byteorder="<") as tif:
        for k, arr in enumerate(levels):
            res = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2 ** k)
                res = dict(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            n_tiles = -(-arr.shape[0] // tile) * -(-arr.shape[1] // tile)
            level_blocks = islice(blocks, n_tiles)
            raw = (block if encode is None else encode.encode(block, r * 2 ** k, c * 2 ** k, 2 ** k)
                   for _, r, c, block in level_blocks)
            tiles = _compressed_tiles(raw, tile)
            if k == 0:
                tif.write(tiles, shape=arr.shape, subifds=len(levels) - 1, metadata=metadata, **res, **options)
            else:
                tif.write(tiles, shape=arr.shape, subfiletype=1, metadata=None, **res, **options)
    log.info("wrote %s: %d x %d uint32 %s, %d pyramid levels", path, *levels[0].shape,
             "labels" if encode is None else "panoptic labels", len(levels))


# --------------------------------------------------------------------------- pictures

def _display_rgb(image: np.ndarray) -> np.ndarray:
    """(h, w) or (h, w, C) of any dtype -> uint8 (h, w, 3), stretched 1st..99.8th percentile.

    One stretch for all channels, so the colour balance of brightfield RGB is kept. C not in
    {1, 3}: the first channel only (we cannot guess a colour mapping for it).
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] not in (1, 3):
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3):
        raise ValueError(f"expected a thumbnail of shape (h, w) or (h, w, C), got {img.shape}")
    img = img.astype(np.float32)
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [1, 99.8]) if finite.size else (0.0, 1.0))
    if hi <= lo:  # flat image: any stretch is fine, avoid dividing by zero
        hi = lo + 1.0
    img = np.nan_to_num((img - lo) / (hi - lo), nan=0.0)
    img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img


def write_overlay_png(thumbnail: np.ndarray, label_thumb: np.ndarray, path: Path) -> None:
    """PNG of `thumbnail` (h, w[, C], any dtype) with the outlines of `label_thumb` (h, w) in yellow.

    If the two thumbnails differ by rounding, the labels are resized by nearest neighbour.
    """
    from PIL import Image
    from skimage.segmentation import find_boundaries
    from skimage.transform import resize

    rgb = _display_rgb(thumbnail)
    labels = np.asarray(label_thumb)
    if labels.shape != rgb.shape[:2]:
        labels = resize(labels, rgb.shape[:2], order=0, preserve_range=True,
                        anti_aliasing=False).astype(labels.dtype)
    # mode="inner": the outline lies on the cell's own pixels, so touching cells keep separate lines
    rgb[find_boundaries(labels, mode="inner")] = (255, 255, 0)
    # Fast zlib level: a 2048² overlay takes ~0.3 s instead of ~4 s at PIL's default, for ~20 % more bytes.
    Image.fromarray(rgb).save(path, compress_level=1)


def start_writer_imports() -> None:
    """Import matplotlib (~0.5 s) and pandas (~0.3 s, cells.csv) in a background thread while the slide is
    analysed, not on the write path.

    Python's import lock makes this safe: the writers' own imports wait for it or find it done.
    """
    import importlib
    import threading
    threading.Thread(target=lambda: [importlib.import_module(m) for m in
                                     ("matplotlib.figure", "matplotlib.backends.backend_agg", "pandas")],
                     name="cellseg-import-writers", daemon=True).start()


def write_area_histogram(areas: np.ndarray, unit: str, path: Path) -> None:
    """PNG histogram of cell `areas` (1-D, in `unit`: "µm²" or "px"), with the median marked.

    Zero cells give an empty plot saying so, so the result folder always has the same files.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    areas = np.asarray(areas, dtype=np.float64).ravel()
    areas = areas[np.isfinite(areas)]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas without pyplot: no global state, no display needed
    ax = fig.add_subplot()
    if areas.size:
        edges = np.histogram_bin_edges(areas, bins="auto")
        bins = edges if len(edges) <= 101 else 100  # outliers can make "auto" absurdly fine
        ax.hist(areas, bins=bins, color="#4878a8")
        median = float(np.median(areas))
        ax.axvline(median, color="#c03030", linestyle="--", label=f"median {median:.4g} {unit}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no cells detected", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"cell area ({unit})")
    ax.set_ylabel("cells")
    ax.set_title(f"Cell area distribution (n = {areas.size})")
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- cells.csv

class CellsTableWriter:
    """Streams cells.csv: the header is written at open (so zero cells still give a valid table),
    then rows per batch. `columns` maps column name -> numpy dtype string, in file order.

    Floats are written with 6 significant digits, NaN as an empty field. Rows are buffered and written
    `flush_rows` at a time (and at close): pandas' CSV writer costs ~5 ms a call whatever the rows, so one call
    per tile of a few dozen cells made the table a third of a big slide's write time.
    """

    def __init__(self, path: Path, columns: dict[str, str], flush_rows: int = 20000):
        self.path = Path(path)
        self.columns = {name: np.dtype(dt) for name, dt in columns.items()}
        self.rows = 0
        self.flush_rows = flush_rows
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._fh: IO[str] | None = open(self.path, "w", newline="", encoding="utf-8")
        csv.writer(self._fh, lineterminator="\n").writerow(list(self.columns))

    def append(self, table) -> None:
        """Append rows from a dict of 1-D arrays or a DataFrame with exactly the declared columns."""
        import pandas as pd

        if self._fh is None:
            raise ValueError(f"{self.path} is already closed")
        got = list(table.columns) if isinstance(table, pd.DataFrame) else list(table)
        if set(got) != set(self.columns):
            missing = [c for c in self.columns if c not in got]
            extra = [c for c in got if c not in self.columns]
            raise ValueError(f"expected the declared cell columns, missing {missing}, unexpected {extra}")
        data = {name: np.asarray(table[name]).astype(dt, copy=False) for name, dt in self.columns.items()}
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise ValueError(f"expected columns of one length, got lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        self._pending.append(data)
        self._pending_rows += n
        self.rows += n
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows."""
        import pandas as pd

        if self._fh is None or not self._pending:
            return
        data = {name: np.concatenate([part[name] for part in self._pending]) for name in self.columns}
        pd.DataFrame(data, columns=list(self.columns)).to_csv(
            self._fh, header=False, index=False, float_format="%.6g", na_rep="", lineterminator="\n")
        self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        if self._fh is not None:
            self.flush()
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "CellsTableWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self._pending = []   # a failed run: its staging folder is discarded, do not format what it buffered
        self.close()

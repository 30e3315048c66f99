"""The label canvas: a uint32 instance-label image the size of the slide, painted tile by tile, compressed.

`LabelStore` is the canvas (a write-back cache of decoded chunks over `ChunkFiles`: zstd-compressed chunks, in
memory up to a budget and in files past it); memory stays bounded whatever the slide's size. results/ome_pyramid.py writes it out.
Coordinates are (row, col) in level-0 pixels, boxes half-open `Box(row0, col0, row1, col1)`.
"""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import ParameterError
from ..geometry import Box
from ..util import thread_scratch


def chunks_under(start: int, stop: int, chunk: int) -> range:
    """Indices of the chunks of size `chunk` that pixels start..stop-1 fall in."""
    return range(start // chunk, (stop - 1) // chunk + 1)


class ChunkFiles:
    """A 2-D uint32 array of zstd-compressed `chunk` x `chunk` blocks (in memory up to a budget, then one file each
    in `folder`); blocks never written are 0.
    (The label canvas, and each level of the label pyramid while it is written: results/ome_pyramid.py.)

    A scratch format private to one run. Not a zarr array: every call through zarr 3's asyncio bridge costs 1.2 ms
    to read and ~5 ms to write a chunk, against 0.3-0.6 ms to compress or decompress a label chunk, and that
    overhead would be most of the label-writing time of a big slide. Threads may store distinct blocks at once
    (the pyramid's levels are built so); one block is written by one thread at a time.

    The first `memory_bytes` of compressed blocks stay in memory and only the rest go to files: creating a file
    cost 0.8 ms a block on our VMs' disks against 0.4 ms to compress it, and label blocks compress to a few kB
    (2 kB each on a dense 8192² slide), so a whole slide's canvas usually never touches the disk, and memory
    stays bounded by the budget whatever the slide's size.
    """

    def __init__(self, folder: Path, height: int, width: int, chunk: int, memory_bytes: int = 64 << 20):
        self.folder, self.shape, self.chunk = Path(folder), (int(height), int(width)), int(chunk)
        shutil.rmtree(self.folder, ignore_errors=True)   # the folder belongs to this store
        self.folder.mkdir(parents=True)
        self.written: set[tuple[int, int]] = set()      # blocks stored (in memory or on disk); the rest are 0
        self._held: dict[tuple[int, int], bytes] = {}   # compressed blocks kept in memory
        self._held_bytes, self._memory_bytes = 0, int(memory_bytes)
        self._lock = threading.Lock()                   # the budget's bookkeeping, for threads storing at once

    def _path(self, i: int, j: int) -> Path:
        return self.folder / f"{i}.{j}.zst"

    def block_shape(self, i: int, j: int) -> tuple[int, int]:
        c = self.chunk
        return min(c, self.shape[0] - i * c), min(c, self.shape[1] - j * c)

    def load(self, i: int, j: int) -> np.ndarray:
        """Block (i, j), decoded (a fresh, writable array)."""
        if (i, j) not in self.written:
            return np.zeros(self.block_shape(i, j), np.uint32)
        return self.decoded(i, j).astype(np.uint32)   # a copy, in native byte order

    def decoded(self, i: int, j: int, scratch: bool = False) -> np.ndarray:
        """Written block (i, j) as a read-only view of its decoded bytes (no copy: reads slice it straight away).
        scratch: decoded into this thread's scratch buffer (util.thread_scratch), valid until the thread's next such
        call, for reads done with it at once."""
        from imagecodecs import zstd_decode
        shape = self.block_shape(i, j)
        size = shape[0] * shape[1] * 4
        out = thread_scratch("chunk", size, np.uint8) if scratch else None
        data = self._held.get((i, j))
        raw = zstd_decode(data if data is not None else self._path(i, j).read_bytes(), out=out)
        return np.frombuffer(raw, "<u4", count=shape[0] * shape[1]).reshape(shape)

    def store(self, i: int, j: int, block: np.ndarray) -> None:
        """Block (i, j) := `block` (its full shape); an all-zero block takes no disk."""
        from imagecodecs import zstd_encode
        if block.shape != self.block_shape(i, j):
            raise ValueError(f"expected block ({i}, {j}) of shape {self.block_shape(i, j)}, got {block.shape}")
        data = zstd_encode(np.ascontiguousarray(block, "<u4"), level=1) if block.any() else None
        with self._lock:
            old = self._held.pop((i, j), None)
            if old is not None:
                self._held_bytes -= len(old)
            in_memory = data is not None and self._held_bytes + len(data) <= self._memory_bytes
            if in_memory:
                self._held[(i, j)] = data
                self._held_bytes += len(data)
        if old is None and (i, j) in self.written and (data is None or in_memory):
            self._path(i, j).unlink()       # its older version was on disk
        if data is None:
            self.written.discard((i, j))
            return
        if not in_memory:
            self._path(i, j).write_bytes(data)
        self.written.add((i, j))

    def remove(self) -> None:
        """Delete the folder and let go of the blocks held in memory: every block is 0 again."""
        with self._lock:
            self._held.clear()
            self._held_bytes = 0
        self.written.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def read(self, row0: int, row1: int, col0: int, col1: int, step: int = 1) -> np.ndarray:
        """uint32 self[row0:row1:step, col0:col1:step] (ends clipped to the array), decoding only the blocks with
        a sampled pixel."""
        row1, col1 = min(row1, self.shape[0]), min(col1, self.shape[1])
        out = np.zeros((max(0, -(-(row1 - row0) // step)), max(0, -(-(col1 - col0) // step))), np.uint32)
        c = self.chunk
        for i in chunks_under(row0, row1, c):
            first_r = row0 + -(-(max(row0, i * c) - row0) // step) * step    # first sampled row in block row i
            if first_r >= min(row1, (i + 1) * c):
                continue
            for j in chunks_under(col0, col1, c):
                first_c = col0 + -(-(max(col0, j * c) - col0) // step) * step
                if first_c >= min(col1, (j + 1) * c) or (i, j) not in self.written:
                    continue
                part = self.decoded(i, j, scratch=True)[first_r - i * c:min(row1, (i + 1) * c) - i * c:step,
                                                        first_c - j * c:min(col1, (j + 1) * c) - j * c:step]
                r, k = (first_r - row0) // step, (first_c - col0) // step
                out[r:r + part.shape[0], k:k + part.shape[1]] = part
        return out


class LabelStore:
    """The uint32 instance-label canvas of shape (height, width) in level-0 pixels, compressed (ChunkFiles).

    Blocks of `chunk` x `chunk` px, zstd-compressed, in memory up to `memory_bytes` and in files in `folder` past
    it (ChunkFiles), fill 0; the pyramid written from the canvas gets as much memory for each of its levels.
    Chunks that stay all zero are never written, so background costs nothing. `folder` belongs to
    the store: anything already there is replaced (pass a fresh folder, e.g. inside the staging
    folder, never a user's folder). Lives for one run:
    the caller removes it with `remove()` (or by deleting its parent folder). Never holds the slide
    in memory uncompressed: every method touches a bounded number of chunks at a time.

    Painting goes through a write-back cache of decoded chunks (at most `cache_bytes`, least recently painted
    evicted first): tiles overlap by their halos, so a chunk is painted by up to nine tiles, and compressing it
    to disk after each of them cost ~12 ms a tile (~3 s on an 8192² slide). Reads flush the cache first.
    """

    def __init__(self, folder: Path, height: int, width: int, chunk: int = 512, cache_bytes: int = 64 << 20,
                 memory_bytes: int = 64 << 20):
        if height <= 0 or width <= 0:
            raise ParameterError(f"expected a label canvas of positive size, got {height} x {width} px")
        if chunk <= 0:
            raise ParameterError(f"expected a positive chunk size, got {chunk}")
        self.folder = Path(folder)
        self.chunk = int(chunk)
        self.memory_bytes = int(memory_bytes)      # compressed chunks held in memory (ChunkFiles), per level
        self._blocks = ChunkFiles(self.folder, height, width, self.chunk, self.memory_bytes)
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
        nuclei sit in one corner touches one chunk, not the tile's four.
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
        for i in chunks_under(top, bottom, c):
            for j in chunks_under(left, right, c):
                chunk = self._cached_chunk(i, j)
                r0, r1 = max(top, i * c), min(bottom, (i + 1) * c)
                c0, c1 = max(left, j * c), min(right, (j + 1) * c)
                sub = labels[r0 - box.row0:r1 - box.row0, c0 - box.col0:c1 - box.col0]
                np.copyto(chunk[r0 - i * c:r1 - i * c, c0 - j * c:c1 - j * c], sub, where=sub != 0)
                self.written_chunks.add((i, j))

    def paint_pixels(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> bool:
        """Write `values` (nonzero uint32) at canvas pixels (rows, cols), chunk by chunk: a tile's nuclei cover a
        few % of it, and painting their pixels skips the tile-sized label image `paint` takes. Returns False,
        painting nothing, when a pixel is given twice (overlapping masks: which one wins is `paint`'s to say)."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        if not len(rows):
            return True
        if rows.min() < 0 or rows.max() >= self.height or cols.min() < 0 or cols.max() >= self.width:
            raise ValueError(f"expected pixels inside the {self.height} x {self.width} canvas")
        c = self.chunk
        i, j = rows // c, cols // c
        widths = np.minimum(c, self.width - j * c)
        key = (i * -(-self.width // c) + j) * (c * c) + (rows - i * c) * widths + (cols - j * c)
        order = np.argsort(key, kind="stable")
        key = key[order]
        if (key[1:] == key[:-1]).any():
            return False
        values = np.asarray(values, np.uint32)[order]
        chunk_of = key // (c * c)
        starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]])
        for a, b in zip(starts.tolist(), np.r_[starts[1:], len(key)].tolist()):
            ci, cj = int(i[order[a]]), int(j[order[a]])
            self._cached_chunk(ci, cj).reshape(-1)[key[a:b] % (c * c)] = values[a:b]
            self.written_chunks.add((ci, cj))
        return True

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

    def chunk_files(self) -> ChunkFiles:
        """The canvas's chunk files, every painted chunk on disk (the pyramid writer reads them)."""
        self.flush()
        return self._blocks

    def remove(self) -> None:
        """Delete the store's folder and what it holds in memory (the end of its one-run lifetime)."""
        self._cache.clear()
        self._blocks.remove()      # the folder is the canvas's, the pyramid's levels inside it

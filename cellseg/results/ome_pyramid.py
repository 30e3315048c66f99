"""labels.ome.tif and panoptic.ome.tif: the label canvas (results/labelstore.py) as tiled, pyramidal OME-TIFFs.

The pyramid is built as chunk files beside the canvas, one level from the previous; each of its tiles is read once
and made into every file's compressed bytes (zlib-ng deflate) by one task on all cores, and the bytes are streamed
into tifffile by one writer thread per file (threads.fan_out). Tiles that hold no cell (most of a whole slide) are
constants, never materialised. `Panoptic` says how panoptic.ome.tif encodes tissue, background and cells in one
label image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import ParameterError
from ..util import fan_out, thread_scratch, usable_cores
from .labelstore import ChunkFiles, LabelStore, chunks_under
from .ome import ome_metadata, resolution_tags

log = logging.getLogger(__name__)


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
    """One pyramid level (ChunkFiles): a region that touches none of its written chunks is a _Constant 0 without
    reading anything. On a whole slide most regions are glass, never written."""

    def __init__(self, blocks: ChunkFiles):
        self.blocks, self.chunk, self.shape = blocks, blocks.chunk, blocks.shape

    def read(self, row0: int, row1: int, col0: int, col1: int, step: int = 1,
             scratch: bool = False) -> np.ndarray | _Constant:
        """uint32 self[row0:row1:step, col0:col1:step] (ends clipped to the level); _Constant(0) where nothing
        was ever written. scratch: a whole chunk comes as this thread's scratch buffer (ChunkFiles.decoded), valid
        until the thread's next such read."""
        row1, col1 = min(row1, self.shape[0]), min(col1, self.shape[1])
        c = self.chunk
        i, j = row0 // c, col0 // c
        whole_chunk = (step == 1 and (row0, col0) == (i * c, j * c)
                       and (row1 - row0, col1 - col0) == self.blocks.block_shape(i, j))
        if whole_chunk and (i, j) in self.blocks.written:
            # as the TIFF tiles are read when they are the chunks' size: the chunk's decoded bytes as they are
            # (read-only), not copied into a fresh array (the copy was most of a tile's read)
            return self.blocks.decoded(i, j, scratch=scratch)
        blank = self.blank(row0, row1, col0, col1, step)
        return self.blocks.read(row0, row1, col0, col1, step) if blank is None else blank

    def blank(self, row0: int, row1: int, col0: int, col1: int, step: int = 1) -> _Constant | None:
        """read's _Constant(0) where the region touches no written chunk, without reading; else None."""
        row1, col1 = min(row1, self.shape[0]), min(col1, self.shape[1])
        c = self.chunk
        if any((i, j) in self.blocks.written for i in chunks_under(row0, row1, c) for j in chunks_under(col0, col1, c)):
            return None
        return _Constant(0, (-(-(row1 - row0) // step), -(-(col1 - col0) // step)))


def _pyramid(store: LabelStore, tile: int) -> list[_SparseLevel]:
    """Levels [level0, level1, ...], level k = level0[::2**k, ::2**k], until the longer side <= tile.

    Levels >= 1 are built as temporary chunk files inside the store's folder, each from the previous level by striding
    one output chunk at a time: the whole pyramid costs ~4/3 of one read of the slide, where striding
    level 0 directly for every level would decode the full slide once per level.
    """
    from concurrent.futures import ThreadPoolExecutor

    levels = [_SparseLevel(store.chunk_files())]
    h, w = store.height, store.width
    c = store.chunk
    # A level's chunks are built on all cores (decoding and encoding them release the GIL); each writes its own file.
    with ThreadPoolExecutor(max(1, min(8, usable_cores())), thread_name_prefix="cellseg-pyramid") as pool:
        while max(h, w) > tile:
            prev = levels[-1]
            h, w = -(-h // 2), -(-w // 2)
            blocks = ChunkFiles(store.folder / f"_level{len(levels)}", h, w, c, store.memory_bytes)

            def build(r: int, col: int, prev=prev, blocks=blocks) -> None:
                block = prev.read(2 * r, 2 * (r + c), 2 * col, 2 * (col + c), step=2)
                if not isinstance(block, _Constant):   # zero chunks stay unwritten (store skips them)
                    blocks.store(r // c, col // c, block)
            list(pool.map(lambda rc: build(*rc), [(r, col) for r in range(0, h, c) for col in range(0, w, c)]))
            levels.append(_SparseLevel(blocks))
    return levels


class Panoptic:
    """How panoptic.ome.tif encodes stuff and things in one uint32 label image:

        value = semantic * label_divisor + instance

    semantic 0 = background (no tissue), 1 = tissue (stuff, instance 0), 2, 3, ... = cell class 1, 2, ...
    (things; instance = the cell's id in cells.csv and labels.ome.tif). label_divisor is the smallest power of
    ten above the largest cell id, at least 1000; summary.json "panoptic" records it and the names.

    tissue: a tissue.TissueMask (its `at` and `constant`, in level-0 px).
    semantic_of_cell: uint32 array indexed by cell id (index 0 unused) -> semantic id (class id + 1).
    """

    def __init__(self, tissue, semantic_of_cell: np.ndarray, class_names: list[str]):
        self.tissue = tissue
        self.semantic_of_cell = np.asarray(semantic_of_cell, np.uint32)
        self.class_names = list(class_names)
        n_cells = len(self.semantic_of_cell) - 1
        self.label_divisor = max(1000, 10 ** len(str(n_cells)))
        if (len(self.class_names) + 2) * self.label_divisor > 2 ** 32:
            raise ParameterError(f"expected at most {2 ** 32 // (len(self.class_names) + 2) - 1} cells for a uint32 "
                                 f"panoptic image, got {n_cells}")

    def describe(self) -> dict:
        semantic = {0: "background", 1: "tissue", **{k + 2: n for k, n in enumerate(self.class_names)}}
        return {"file": "panoptic.ome.tif", "encoding": "value = semantic * label_divisor + instance",
                "label_divisor": self.label_divisor, "semantic": {str(k): v for k, v in semantic.items()},
                "things": [str(k + 2) for k in range(len(self.class_names))], "stuff": ["0", "1"]}

    def blank(self, shape: tuple[int, int], row0: int, col0: int, step: int) -> _Constant | None:
        """The panoptic values of a block without cells (as `encode` places it) when they are one value, all tissue or
        all background; None at the tissue's edge."""
        rows = row0 + np.array([0, shape[0] - 1]) * step
        cols = col0 + np.array([0, shape[1] - 1]) * step
        tissue = self.tissue.constant(rows, cols)
        return None if tissue is None else _Constant(int(tissue) * self.label_divisor, shape)

    def encode(self, labels: np.ndarray | _Constant, row0: int, col0: int, step: int,
               out: np.ndarray | None = None) -> np.ndarray | _Constant:
        """Panoptic values for a block of instance labels whose [i, j] is level-0 pixel (row0 + i*step, col0 + j*step),
        into `out` when given (a C-ordered uint32 array of the block's size, e.g. a thread's scratch)."""
        if isinstance(labels, _Constant):   # no cells here (only ever 0): constant where the tissue is
            blank = self.blank(labels.shape, row0, col0, step)
            if blank is not None:
                return blank
            labels = labels.materialise()
        rows = row0 + np.arange(labels.shape[0]) * step
        cols = col0 + np.arange(labels.shape[1]) * step
        if out is None or out.size != labels.size:
            out = np.empty(labels.shape, np.uint32)     # C order, so that its flat view below is a view
        out = out.reshape(labels.shape)
        tissue = self.tissue.constant(rows[[0, -1]], cols[[0, -1]]) if labels.size else None
        if tissue is None:
            np.multiply(self.tissue.at(rows, cols), np.uint32(self.label_divisor), out=out)
        else:   # a tile inside the tissue (most tiles with cells): a fill, not a tile-sized gather (1 ms a tile)
            out.fill(int(tissue) * self.label_divisor)
        # the cells' pixels by their flat indices: a few percent of a tile, where boolean masks cost whole-tile passes
        cells = np.flatnonzero(labels > 0)
        ids = labels.reshape(-1)[cells]
        out.reshape(-1)[cells] = self.semantic_of_cell[ids] * np.uint32(self.label_divisor) + ids
        return out


def _encoded_tiles(levels: list[_SparseLevel], encodings: list[Panoptic | None], tile: int,
                   level: int = 3) -> Iterator[list[bytes]]:
    """Every TIFF tile of every level (levels in order, each row-major), as the deflate-compressed bytes of each
    label image: the labels as they are (None) or through a Panoptic encoding, zero-padded to tile x tile
    (little-endian uint32).

    Each tile is read once and made into every image's bytes by one task on a pool of threads (the codecs release
    the GIL), a bounded number ahead of the files' writers: the block is decoded, and panoptic values are written,
    into the thread's own scratch buffers (util.thread_scratch: fresh memory for each 1 MB block cost more than
    decoding it). Most of a whole
    slide's tiles are constant (glass: 0; tissue without cells: the panoptic tissue value): a constant tile is
    compressed once and its bytes reused, and a region with no cell is never read.

    The codec is zlib-ng (imagecodecs) at level 3: the zlib stream every TIFF reader opens (compression 8, Adobe
    deflate: tifffile/napari, QuPath's Bio-Formats, libtiff). Measured on the label tiles of an 8192² dense slide
    (1 MB uint32 tiles, 98.6 % zeros; Zen 4): level 3 0.30 ms a labels tile (0.71 MB for level 0) and 0.33 ms a
    panoptic tile (1.87 MB), against level 6's 0.45 / 0.56 ms (0.61 / 1.58 MB); both files written 0.61 -> 0.51 s,
    1.2 -> 1.1 s of CPU, for 17 % more bytes (3.4 -> 4.0 MB, the result folder +2.5 %). libdeflate is slower
    still on these tiles (level 1: 2.7 ms, 0.77 MB). zstd (0.19 ms, 0.48 MB) is quicker, but QuPath opens
    OME-TIFF through Bio-Formats, whose zstd decoding came for CZI files and is not known for TIFF tiles
    (compression 50000), while deflate it reads in every version.
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    from imagecodecs import zlibng_encode

    constant: dict[tuple, bytes] = {}    # shared by the threads: at worst a constant tile is compressed twice

    def compress(block: np.ndarray) -> bytes:
        if block.shape != (tile, tile):
            padded = np.zeros((tile, tile), np.uint32)
            padded[:block.shape[0], :block.shape[1]] = block
            block = padded
        return zlibng_encode(np.ascontiguousarray(block, dtype="<u4"), level=level)

    def constant_key(block: np.ndarray | _Constant) -> tuple | None:
        if isinstance(block, _Constant):
            return block.value, block.shape
        if not block.size:
            return None
        first = block.flat[0]
        # a sparse sample first: a tile with cells almost always differs there, and the full pass over 1 MB is
        # then skipped (it was ~0.3 ms a tile)
        if (block[::31, ::37] != first).any() or (block != first).any():
            return None
        return int(first), block.shape

    def tile_bytes(block: np.ndarray | _Constant) -> bytes:
        key = constant_key(block)
        if key is None:
            return compress(block)
        if key not in constant:
            constant[key] = compress(block.materialise() if isinstance(block, _Constant) else block)
        return constant[key]

    def encoded(block: np.ndarray | _Constant, encode: Panoptic | None, r: int, c: int, k: int):
        if encode is None:
            return block
        out = thread_scratch("panoptic", block.shape[0] * block.shape[1], np.uint32)
        return encode.encode(block, r * 2 ** k, c * 2 ** k, 2 ** k, out=out)

    def task(k: int, r: int, c: int) -> list[bytes]:
        block = levels[k].read(r, r + tile, c, c + tile, scratch=True)     # valid until this thread's next read
        return [tile_bytes(encoded(block, encode, r, c, k)) for encode in encodings]

    def known(k: int, r: int, c: int) -> list[bytes] | None:
        """Every image's bytes of a tile without cells whose images are constants compressed before (glass, most
        of a whole slide; tissue without cells), made without a thread; else None."""
        blank = levels[k].blank(r, r + tile, c, c + tile)
        if blank is None:
            return None
        made = []
        for encode in encodings:
            value = blank if encode is None else encode.blank(blank.shape, r * 2 ** k, c * 2 ** k, 2 ** k)
            data = None if value is None else constant.get(constant_key(value))
            if data is None:
                return None
            made.append(data)
        return made

    workers = max(1, min(8, usable_cores()))
    with ThreadPoolExecutor(workers, thread_name_prefix="cellseg-deflate") as pool:
        pending: deque[Future] = deque()
        for k, lev in enumerate(levels):
            h, w = lev.shape
            for r in range(0, h, tile):
                for c in range(0, w, tile):
                    made = known(k, r, c)
                    if made is None:
                        pending.append(pool.submit(task, k, r, c))
                    else:
                        pending.append(done := Future())
                        done.set_result(made)
                    while len(pending) > 2 * workers or (pending and pending[0].done()):
                        yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class LabelPyramid:
    """The label canvas's pyramid, built once: level k = level0[::2**k, ::2**k] (nearest, never interpolated) until
    the longer side <= `tile`, levels >= 1 as chunk files inside the store's folder (_pyramid). It writes the label
    images (`write`) and gives overlay.png its label thumbnail (`thumbnail`) from the deepest level that holds it,
    so the thumbnail does not decode the whole canvas once more before the pyramids can start."""

    def __init__(self, store: LabelStore, tile: int = 512):
        if tile <= 0 or tile % 16:
            raise ParameterError(f"expected a TIFF tile size that is a positive multiple of 16, got {tile}")
        self.store, self.tile = store, int(tile)
        self.levels = _pyramid(store, self.tile)

    def thumbnail(self, factor: int) -> np.ndarray:
        """The same pixels as LabelStore.thumbnail(factor): canvas[::factor, ::factor], read from level k with
        2**k the largest power of two dividing `factor` (a 2048² overlay of an 8192² slide is level 2 as it is)."""
        if factor < 1:
            raise ParameterError(f"expected a thumbnail factor >= 1, got {factor}")
        k = 0
        while k + 1 < len(self.levels) and factor % 2 ** (k + 1) == 0:
            k += 1
        if k == 0:
            return self.store.thumbnail(factor)
        level, step = self.levels[k], factor // 2 ** k
        return level.blocks.read(0, level.shape[0], 0, level.shape[1], step)

    def write(self, targets: dict[Path, Panoptic | None], mpp: float | None) -> None:
        """Each path of `targets` as a pyramidal OME-TIFF: the labels as they are (None) or through a Panoptic
        encoding (write_label_images)."""
        _check_mpp(mpp)
        _write_pyramids_together(self.levels, targets, mpp, self.tile)

    def remove(self) -> None:
        """Delete the levels' chunk files and what they hold in memory (level 0 is the canvas: its store removes
        it)."""
        for level in self.levels[1:]:
            level.blocks.remove()


def write_label_images(store: LabelStore, targets: dict[Path, Panoptic | None], mpp: float | None,
                       tile: int = 512) -> None:
    """Write the label canvas as a uint32 tiled pyramidal OME-TIFF (BigTIFF) to each path of `targets`: as is
    (None) or through a Panoptic encoding. The pyramid is built once, and each of its blocks read once, for all.

    Level 0 is the full canvas; SubIFD level k is level0[::2**k, ::2**k] (nearest, never interpolated) until the
    longer side <= `tile`. Tiles `tile` x `tile` (a multiple of 16), deflate-compressed. OME metadata: axes YX,
    PhysicalSizeX/Y = `mpp` in µm when known (and the TIFF resolution tags to match). Tiles are streamed from the
    store; peak memory is a few tiles per file.
    """
    _check_mpp(mpp)      # before the pyramid is built
    pyramid = LabelPyramid(store, tile)
    try:
        pyramid.write(targets, mpp)
    finally:
        pyramid.remove()


def _check_mpp(mpp: float | None) -> None:
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ParameterError(f"expected a positive pixel size in µm/px, got {mpp}")


def _write_pyramids_together(levels: list, targets: dict[Path, Panoptic | None], mpp: float | None,
                             tile: int) -> None:
    """One writer thread per file, all fed from a single read of the pyramid, each tile made into every file's bytes
    at once (_encoded_tiles), through small queues so memory stays a few tiles per file."""
    writers = [partial(_write_pyramid, levels, path, mpp, tile, encode is not None, which)
               for which, (path, encode) in enumerate(targets.items())]
    fan_out(_encoded_tiles(levels, list(targets.values()), tile), writers,
            names=[f"cellseg-write-{path.name}" for path in targets])


def _write_pyramid(levels: list, path: Path, mpp: float | None, tile: int, panoptic: bool, which: int,
                   tiles: Iterator[list[bytes]]) -> None:
    """One pyramidal OME-TIFF from `tiles` (_encoded_tiles' order): the `which`-th bytes of each."""
    from itertools import islice

    import tifffile
    # Tiles go to tifffile already compressed (_encoded_tiles): zlib streams, TIFF compression 8 (deflate).
    options = dict(dtype=np.uint32, tile=(tile, tile), compression="zlib", photometric="minisblack")
    with tifffile.TiffWriter(path, bigtiff=True, ome=True, byteorder="<") as tif:
        for k, arr in enumerate(levels):
            res = resolution_tags(mpp, 2 ** k)
            n_tiles = -(-arr.shape[0] // tile) * -(-arr.shape[1] // tile)
            data = (made[which] for made in islice(tiles, n_tiles))
            if k == 0:
                tif.write(data, shape=arr.shape, subifds=len(levels) - 1, metadata=ome_metadata("YX", mpp), **res,
                          **options)
            else:
                tif.write(data, shape=arr.shape, subfiletype=1, metadata=None, **res, **options)
    log.info("wrote %s: %d x %d uint32 %s, %d pyramid levels", path, *levels[0].shape,
             "panoptic labels" if panoptic else "labels", len(levels))

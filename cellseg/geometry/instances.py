"""The cells that flow between the stages, as plain numpy, and what a detector provides. No torch here.

    detector --TileDetections (one tile, tile frame)--> merge --Instances (slide frame)--> measure, export

Coordinates are (row, col) pixels, boxes half-open (row0, col0, row1, col1), masks cropped to their boxes (never
N full-tile masks). docs/architecture.md describes each stage's contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from .tiling import Box, TileSpec, owned_box, seam_band_px


@dataclass
class TileDetections:
    """Cells found in one tile, in that tile's read-box pixel frame (row, col), masks cropped to their boxes.

    boxes: (N, 4) int64 half-open (row0, col0, row1, col1), tight around each mask.
    masks: N bool arrays, masks[i].shape == (row1 - row0, col1 - col0).
    scores: (N,) float32 in [0, 1]; class_ids: (N,) int64, >= 1.
    below: the detections scoring under the detector's threshold down to its candidate floor, boxes and scores
    only (no mask was made for them): (K, 5) float32 row0, col0, row1, col1, score, in the same frame (`no_candidates`
    when the detector keeps none). The count against the score threshold (summary.json "score_curve") comes from them.
    """

    boxes: np.ndarray
    masks: list[np.ndarray]
    scores: np.ndarray
    class_ids: np.ndarray
    below: np.ndarray = field(default_factory=lambda: no_candidates())

    def __len__(self) -> int:
        return len(self.masks)

    @classmethod
    def empty(cls) -> TileDetections:
        return cls(np.zeros((0, 4), np.int64), [], np.zeros(0, np.float32), np.zeros(0, np.int64))


def no_candidates() -> np.ndarray:
    """No below-threshold candidates: a (0, 5) float32 array (TileDetections.below, Instances.below)."""
    return np.zeros((0, 5), np.float32)


@dataclass
class Instances:
    """N cells in slide coordinates (level-0 px), masks cropped to their boxes.

    boxes: (N, 4) int64 half-open (row0, col0, row1, col1); masks[i] bool of shape boxes[i] size;
    scores: (N,) float32; class_ids: (N,) int64 >= 1; tile_index: (N,) int64 owning tile;
    cut: (N,) bool, True where the cell was larger than the halo and clipped at a read edge.
    below: the owning tile's below-threshold candidates (TileDetections.below) whose box centre lies in its core,
    in slide coordinates: (K, 5) float32. They belong to the tile, not to its cells: `take` leaves them out.
    """

    boxes: np.ndarray
    masks: list[np.ndarray]
    scores: np.ndarray
    class_ids: np.ndarray
    tile_index: np.ndarray
    cut: np.ndarray
    below: np.ndarray = field(default_factory=lambda: no_candidates())

    def __len__(self) -> int:
        return len(self.masks)

    @classmethod
    def empty(cls) -> Instances:
        return cls(np.zeros((0, 4), np.int64), [], np.zeros(0, np.float32), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), np.zeros(0, bool))

    def take(self, index: np.ndarray) -> Instances:
        index = np.asarray(index, np.int64)
        return Instances(self.boxes[index], [self.masks[i] for i in index], self.scores[index],
                         self.class_ids[index], self.tile_index[index], self.cut[index])

    @staticmethod
    def concat(parts: list[Instances]) -> Instances:
        """The parts' cells one after the other, and all their below-threshold candidates."""
        below = [p.below for p in parts if len(p.below)]
        parts = [p for p in parts if len(p)]
        if not parts:
            return Instances.empty() if not below else replace(Instances.empty(), below=np.concatenate(below))
        return Instances(np.concatenate([p.boxes for p in parts]), [m for p in parts for m in p.masks],
                         np.concatenate([p.scores for p in parts]), np.concatenate([p.class_ids for p in parts]),
                         np.concatenate([p.tile_index for p in parts]), np.concatenate([p.cut for p in parts]),
                         np.concatenate(below) if below else no_candidates())


class TileDetector(Protocol):
    """What the pipeline needs of a detector: cellseg.detection.detector.Detector (the Mask R-CNN), a test-time-augmentation
    wrapper around it, or a test double. Everything the pipeline uses is declared here; it probes for nothing.

    device: where the network runs, as torch.device or its name ("cpu", "cuda", "cuda:1"); the tissue U-Net runs
        there too.
    class_names: the foreground classes; class id k >= 1 of a detection is class_names[k - 1].
    """

    device: object
    class_names: Sequence[str]

    def calibrated(self, windows: Sequence[np.ndarray], gray: bool = False) -> TileDetector:
        """The detector for one slide: slide-level statistics fixed from `windows` (network input like the tiles:
        float32 (3, h, w), all the same shape, taken where the slide's cells are), and the score threshold for a
        slide whose network input has colour, or none (`gray`: planning.NetworkInput.gray). Called once per slide,
        before its tiles, which then go to the detector it returns; this one is left as it is. A detector without
        slide-level statistics or thresholds of its own returns itself."""

    def prepare(self, raw: np.ndarray, box: Box, network) -> object:
        """A tile's native pixels `raw` (h, w, C) of slide box `box`, made ready for `detect` by `network`
        (planning.NetworkInput): called in the pipeline's reader threads, so that the detector's own thread only
        detects. On a CPU, the network input itself (`network.of(raw, box)`: HostInput); on a GPU, the native pixels
        in page-locked memory, turned into the network input on the device (detection.detector.PinnedTile): a
        quarter of the bytes to transfer for 8-bit RGB, and no float arithmetic on the host."""

    def detect(self, images: Sequence[object], tiles: Sequence[TileSpec],
               scale: float = 1.0) -> list[TileDetections]:
        """One TileDetections per image, in the frame of its tile's read box at slide resolution.

        images: what `prepare` made of `tiles` (or their network input: float32 (3, h, w), see
        planning/intensity.py), resampled by `scale` network px per slide px: each image is round(read.height *
        scale) x round(read.width * scale). The detector may leave out cells its tile cannot own
        (`detection_frames`).
        """


class HostInput:
    """A detector whose tiles are prepared on the host: its `prepare` is the network input itself."""

    def prepare(self, raw: np.ndarray, box: Box, network) -> np.ndarray:
        return network.of(raw, box)


def detection_frames(tiles: Sequence[TileSpec]) -> tuple[list[tuple[int, int]], list[Box]]:
    """What a detector needs to know of each tile besides its pixels: the shape of its read box (its detections come
    back in that frame, at slide resolution) and, in that frame, the box its owned cells are centred in
    (tiling.owned_box), with 2 px to spare: centroids are means of pixel indices. A cell whose mask cannot reach
    that box is dropped by the seam merge anyway, so the detector need not finish it."""
    shapes, owned = [], []
    for tile in tiles:
        own, read = owned_box(tile, seam_band_px(tile.halo_px), margin_px=2), tile.read
        shapes.append(read.shape)
        owned.append(Box(own.row0 - read.row0, own.col0 - read.col0, own.row1 - read.row0, own.col1 - read.col0))
    return shapes, owned

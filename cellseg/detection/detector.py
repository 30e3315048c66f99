"""Running the cell Mask R-CNN on tiles: `Detector` (a loaded network on a device) turns normalised tiles into
TileDetections. It provides what the pipeline needs of a detector (instances.TileDetector).

This is the only module (with the training adapter) that sees torchvision's conventions: xyxy float boxes and
28x28 soft masks. Everything it returns is in (row, col) tile pixels. The network is built in detection/network.py.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torchvision.models.detection import MaskRCNN

from ..errors import ParameterError
from ..geometry import Box, TileDetections, TileSpec, detection_frames, no_candidates
from ..planning.intensity import IntensityRange, network_input_on_device, network_shape, select_channels
from ..planning.protocol import tiles_per_pass
from .network import load_network
from .precision import resolve_precision
from .rcnn_parts import TileNetwork, host_to_device, mask_extent
from .roi_align import matrix_roi_pools
from .slide_norm import fold_slide_norms, measure_slide_norms
from .streams import ForwardStreams, cpu_stream_count, cpu_threads

log = logging.getLogger(__name__)

# Detections from this score up to the threshold come back as boxes and scores (no masks): the count against the
# threshold from 0.3 (the bottom of validation's sweep) up, at the cost of a few more boxes through the box NMS.
CANDIDATE_FLOOR = 0.3


def paste_masks_at_box_size(boxes_xyxy: torch.Tensor, mask_probs: torch.Tensor, height: int | Sequence[int],
                            width: int | Sequence[int], threshold: float = 0.5,
                            scale: float = 1.0) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Turn the network's (N, 1, M, M) soft masks into tight boolean crops inside a height x width tile (or, given
    one height and width a mask, each inside its own: a batch's tiles pasted together).

    Each mask, with a 1-cell zero border, is laid out where its training target was cut (rcnn_parts.mask_extent),
    and every tile pixel centre inside takes the bilinear value of the cells there (F.interpolate's rule,
    align_corners=False), thresholded; no extent is rounded to whole pixels. On the held-out subset of 24 images a
    modality, against torchvision's paste: IoU 0.5-0.95 (the DSB2018 score) +0.028 pooled, AP50 +0.001
    (docs/model.md). scale: network px per tile px, when the network saw the tile resampled
    (`boxes_xyxy` are then in network px, the height x width frame in tile px): tile px j is network px
    (j + 0.5) * scale. All the masks are sampled at once (two batched matrix products: 6-10x faster than
    resizing each mask). Returns (boxes (K, 4) int row0, col0, row1, col1, masks, kept indices).
    """
    # Sampled and thresholded where the masks are (on a GPU: there), only the boolean masks cross to the host, and
    # the host waits for the device once plus once per part of like-sized masks.
    device = mask_probs.device
    boxes = boxes_xyxy.detach().to(device, torch.float64)
    probs = mask_probs.detach().float()
    n = boxes.shape[0]
    if n == 0:
        return np.zeros((0, 4), np.int64), [], np.zeros(0, np.int64)
    cells = probs.shape[-1] + 2
    padded = F.pad(probs[:, 0], (1, 1, 1, 1))
    low, high = mask_extent(boxes, probs.shape[-1])     # (x, y) network px
    first = torch.floor(low / scale).clamp(min=0)                                    # (col, row) tile px
    frames = np.stack(np.broadcast_arrays(np.asarray(width, np.float64), np.asarray(height, np.float64)), -1)
    frame = host_to_device(np.broadcast_to(frames, (n, 2)), device, torch.float64)
    count = (torch.minimum(torch.ceil(high / scale), frame) - first).clamp(min=0)
    first_at, count_at = first.long().tolist(), count.long().tolist()    # one copy to the host, not one a mask
    pasted: dict[int, tuple[tuple[int, int, int, int], np.ndarray]] = {}
    # masks of like size together, a few million samples at a time: one large box among a thousand small ones does
    # not make every mask its size
    largest = [max(c) for c in count_at]
    order = sorted(range(n), key=largest.__getitem__)
    order_on_device = host_to_device(order, device, torch.int64)
    start = 0
    while start < n:
        side = max(1, largest[order[start]])
        stop = start + 1
        while stop < n and (stop - start + 1) * max(side, largest[order[stop]]) ** 2 <= _SAMPLES_AT_ONCE:
            side = max(side, largest[order[stop]])
            stop += 1
        part = order[start:stop]
        at = order_on_device[start:stop]
        rows = _bilinear_weights(first[at, 1], count[at, 1], low[at, 1], high[at, 1] - low[at, 1], cells, scale)
        cols = _bilinear_weights(first[at, 0], count[at, 0], low[at, 0], high[at, 0] - low[at, 0], cells, scale)
        above = (torch.bmm(torch.bmm(rows, padded[at]), cols.transpose(1, 2)) > threshold).cpu().numpy()
        # each mask's tight bounds inside its own rows_in x cols_in, for the part at once (a loop over masks cost
        # ~16 us a mask in Python: ~2 s of a 20480² slide's detection thread)
        counts = np.asarray([count_at[i] for i in part]).reshape(-1, 2)     # (cols_in, rows_in)
        above &= np.arange(above.shape[1])[None, :, None] < counts[:, 1, None, None]
        above &= np.arange(above.shape[2])[None, None, :] < counts[:, 0, None, None]
        in_rows, in_cols = above.any(2), above.any(1)
        r0, c0 = in_rows.argmax(1), in_cols.argmax(1)
        r1, c1 = in_rows.shape[1] - in_rows[:, ::-1].argmax(1), in_cols.shape[1] - in_cols[:, ::-1].argmax(1)
        bounds = np.stack([r0, c0, r1, c1], axis=1).tolist()
        for k in np.flatnonzero(in_rows.any(1)).tolist():
            i, (b_r0, b_c0, b_r1, b_c1) = part[k], bounds[k]
            col0, row0 = first_at[i]
            pasted[i] = ((row0 + b_r0, col0 + b_c0, row0 + b_r1, col0 + b_c1),
                         np.ascontiguousarray(above[k, b_r0:b_r1, b_c0:b_c1]))
        start = stop
    kept = sorted(pasted)
    boxes_out = np.asarray([pasted[i][0] for i in kept], np.int64).reshape(-1, 4)
    return boxes_out, [pasted[i][1] for i in kept], np.asarray(kept, np.int64)


_SAMPLES_AT_ONCE = 4_000_000     # paste_masks_at_box_size: masks x rows x columns sampled in one product (16 MB)


def _bilinear_weights(first: torch.Tensor, count: torch.Tensor, start: torch.Tensor, extent: torch.Tensor,
                      cells: int, scale: float) -> torch.Tensor:
    """(n, max count, cells) weights sampling each mask's `cells` cells, spread over network px start .. start +
    extent, at the centres of its tile px first .. first + count - 1 (tile px j: network px (j + 0.5) * scale);
    F.interpolate's bilinear rule (align_corners=False, edges clamped); rows past a mask's count are 0."""
    size = max(1, int(count.max()))
    j = torch.arange(size, dtype=torch.float64, device=first.device)
    centres = (first[:, None] + j + 0.5) * scale - start[:, None]
    source = (centres * (cells / extent[:, None]) - 0.5).clamp(min=0)
    low = source.floor().clamp(max=cells - 1)
    frac = (source - low).float()
    low = low.long()
    inside = (j < count[:, None]).float()
    weights = torch.zeros(len(first), size, cells, device=first.device)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, (low + 1).clamp(max=cells - 1)[..., None], (frac * inside)[..., None])
    return weights


# Pixel types a tile crosses to the device in (others, rare in slides, are normalised on the host as on a CPU).
_DEVICE_INPUT_DTYPES = {np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "float16", "float32", "float64")}


@dataclass(frozen=True)
class PinnedTile:
    """A tile as a GPU detector takes it from the reader threads (Detector.prepare): its native pixels (h, w, 1 or 3:
    the model channel or RGB) in page-locked host memory, copied to the device asynchronously and made into the
    network input there (planning.intensity.network_input_on_device). `shape` is the network input's (3, h', w')."""

    pixels: torch.Tensor
    intensity: IntensityRange
    scale: float
    shape: tuple[int, int, int]

    def on(self, device: torch.device) -> torch.Tensor:
        """The network input, float32 (3, h', w') on `device` (the copy queued behind the device's work, not waited
        for: the pixels are page-locked)."""
        if self.pixels.dtype == torch.uint16:
            # 16-bit pixels cross as they are but as int16 bit patterns: CUDA's uint16 has few operators, int16 all
            pixels = self.pixels.view(torch.int16).to(device, non_blocking=True).to(torch.int32).bitwise_and_(0xFFFF)
        else:
            pixels = self.pixels.to(device, non_blocking=True)
        return network_input_on_device(pixels, self.shape[1:], self.intensity, self.scale)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error, not a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("expected a CUDA GPU for --device cuda, found none (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ParameterError(f"expected --device auto, cpu or cuda, got {device!r}")
    return torch.device(device)


class Detector:
    """A loaded network on a device: feed it normalised tiles, get TileDetections back (an instances.TileDetector).

    The model comes from network.build_model (bundle.Bundle.build): its RoI heads are detection.rcnn_parts.TileRoIHeads. The
    detector takes the model over (eval mode, on `device`, its thresholds set) and is configured once, here:
    score_threshold: detections scoring below are dropped (inside torchvision, before the mask head);
    gray_score_threshold: the score threshold instead for a slide whose network input has no colour (`calibrated`
    with gray=True; None: score_threshold);
    mask_threshold: soft-mask probability threshold; proposal_threshold: RPN objectness below this never reaches
    the box head; batch_size: tiles per forward pass (on a CPU with streams, one; None: the device's,
    planning.tiles_per_pass), halved for the rest of the slide when a GPU runs out of memory; precision: auto | fp32 | bf16 on a CPU
    (cellseg.detection.precision), a GPU runs fp16 autocast unless fp32. A slide's normalisation comes as another
    detector (`calibrated`).
    cpu_streams: on a CPU, forward passes of one tile each run side by side, each on its share of torch's threads
    (detection.streams; None: two where there are two threads to share, as measured there).
    candidate_floor: detections scoring from this floor up to the threshold come back as boxes and scores without
    masks (TileDetections.below: the count against the threshold, issue 48); None: none come back.
    input_on_device: tiles reach `detect` as their native pixels (PinnedTile, page-locked on a GPU) and become the
    network input on the device; None: on a GPU (a CPU prepares them in the reader threads, where they wait anyway).
    """

    def __init__(self, model: MaskRCNN, device: torch.device, *, class_names: tuple[str, ...] = ("nucleus",),
                 score_threshold: float = 0.5, mask_threshold: float = 0.5, proposal_threshold: float = 0.0,
                 batch_size: int | None = None, precision: str = "fp32", cpu_streams: int | None = None,
                 gray_score_threshold: float | None = None, candidate_floor: float | None = CANDIDATE_FLOOR,
                 input_on_device: bool | None = None):
        self.model, self.device, self.class_names = model, device, tuple(class_names)
        self.input_on_device = device.type == "cuda" if input_on_device is None else input_on_device
        self.candidate_floor = candidate_floor
        # score_threshold: the one in force (a calibrated detector's is its slide's); the pair: both to choose from
        self.score_threshold, self.mask_threshold = score_threshold, mask_threshold
        self.colour_and_gray_thresholds = (score_threshold, score_threshold if gray_score_threshold is None
                                           else gray_score_threshold)
        self.proposal_threshold, self.precision = proposal_threshold, precision
        self.batch_size = tiles_per_pass(device) if batch_size is None else batch_size
        self.streams = None
        if device.type == "cpu":
            threads = cpu_threads()
            streams = cpu_stream_count(threads) if cpu_streams is None else cpu_streams
            if streams > 1:
                # one tile per pass: as fast as 4 on both cores (7.9 against 8.1 s for 8 tiles), and no stream
                # waits for another's last tile of a batch
                self.streams = ForwardStreams(streams, max(1, threads // streams))
        model.eval().to(device)
        if device.type == "cuda":
            self.autocast_dtype = None if precision == "fp32" else torch.float16
            self.precision_note = "fp32 as asked" if precision == "fp32" else "fp16 autocast on the GPU"
        else:
            chosen, self.precision_note = resolve_precision(precision, "cpu")
            # bf16 convolutions and linear layers; RoIAlign pools in fp32 and the predictors hand on fp32 logits
            # and box deltas (rcnn_parts); the slide's GroupNorm statistics are measured in fp32 (calibrated).
            self.autocast_dtype = torch.bfloat16 if chosen == "bf16" else None
        if device.type == "cpu":
            # oneDNN convolutions run ~20 % faster on NHWC than NCHW here (measured on the backbone).
            model.to(memory_format=torch.channels_last)
            matrix_roi_pools(model)   # RoIAlign as matrix products on the channels_last features
        # Filter inside torchvision, before the mask head: otherwise every box scoring > 0.05 (4x the kept
        # cells on the example mosaic) goes through the mask branch only to be thrown away here. At the lowest of the
        # two thresholds and the candidate floor: the shared model serves slides of either; only boxes at the slide's
        # threshold go on to the mask branch (TileRoIHeads' mask_score), the others come back as boxes and scores.
        model.roi_heads.score_thresh = min(*self.colour_and_gray_thresholds,
                                           *(() if candidate_floor is None else (candidate_floor,)))
        # Proposals: a cell-free tile needs few, a dense one many; an objectness floor scales the box head's
        # work with the cells present instead of always running it on rpn_post_nms_top_n proposals.
        model.rpn.score_thresh = proposal_threshold
        self.network = TileNetwork(model)   # per-tile statistics
        self.seen_input: tuple[np.ndarray, dict[str, torch.Tensor]] | None = None      # see calibrated

    @classmethod
    def from_bundle(cls, bundle, device: str, *, score_threshold: float, mask_threshold: float,
                    batch_size: int | None = None, precision: str = "fp32",
                    gray_score_threshold: float | None = None,
                    candidate_floor: float | None = CANDIDATE_FLOOR) -> Detector:
        """A bundle's network (bundle.Bundle) on `device` (auto|cpu|cuda), with its classes and proposal floor."""
        return cls(load_network(bundle), resolve_device(device), class_names=tuple(bundle.model.classes),
                   score_threshold=score_threshold, mask_threshold=mask_threshold, batch_size=batch_size,
                   proposal_threshold=bundle.proposal_threshold, precision=precision,
                   gray_score_threshold=gray_score_threshold, candidate_floor=candidate_floor)

    def prepare(self, raw: np.ndarray, box: Box, network) -> np.ndarray | PinnedTile:
        """The TileDetector's prepare, in a reader thread: on a CPU the network input (`network.of`); with
        input_on_device the native pixels as a PinnedTile (on a GPU page-locked, so that their copy overlaps the
        network's work), unless the slide is shrunk for the network (scikit-image's anti-aliased resize, on the host)."""
        if not self.input_on_device or network.scale.factor < 1 or raw.dtype not in _DEVICE_INPUT_DTYPES:
            return network.of(raw, box)
        pixels = torch.from_numpy(np.ascontiguousarray(select_channels(raw, network.channel)))
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        scale = network.scale.factor
        return PinnedTile(pixels, network.intensity, scale, (3, *network_shape(box.shape, scale)))

    def _on_device(self, image: np.ndarray | PinnedTile) -> torch.Tensor:
        if isinstance(image, PinnedTile):
            return image.on(self.device)
        return torch.from_numpy(np.ascontiguousarray(image)).to(self.device, non_blocking=True)

    @property
    def slide_calibrated(self) -> bool:
        """Whether this detector runs with a slide's statistics (`calibrated`) rather than per-tile ones."""
        return self.network.body is not self.model.backbone.body

    @torch.no_grad()
    def calibrated(self, windows: Sequence[np.ndarray], gray: bool = False) -> Detector:
        """This detector with one slide's GroupNorm statistics, measured on `windows` (normalised like tiles, all
        the same shape) pooled over all of them and folded into a copy of the backbone's convolutions
        (detection.slide_norm.fold_slide_norms), and the slide's score threshold: the gray one when `gray`, the
        slide's network input having no colour (planning.NetworkInput.gray). Every other part of the network is
        shared; this detector and its model are left as they are. Without windows, or for a network without
        SlideGroupNorm: per-tile statistics (as in training).

        A single window is kept with the body's output on it: a slide no larger than a window is also a single
        tile, the same pixels, and detecting it then skips the body pass that calibrating has just made
        (`_detect_batch`). Several windows never equal a tile (those are 512 px, a tile's read box is larger), so
        nothing is kept for them."""
        colour_threshold, gray_threshold = self.colour_and_gray_thresholds
        threshold = gray_threshold if gray else colour_threshold
        if not windows:
            return self._with_body(None, threshold)
        body = copy.deepcopy(self.model.backbone.body)   # measured on a copy: the shared model keeps per-tile ones
        batch = [torch.from_numpy(np.ascontiguousarray(w)).to(self.device) for w in windows]
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            windows_in = self.model.transform(batch)[0].tensors
            if self.device.type == "cpu":   # the body's weights are channels_last there (__init__): so its input
                windows_in = windows_in.contiguous(memory_format=torch.channels_last)
            measured = measure_slide_norms(body, windows_in)
        if measured is None:
            return self._with_body(None, threshold)
        folded = fold_slide_norms(body)     # in place: body is this call's own copy
        if self.device.type == "cpu":
            folded.to(memory_format=torch.channels_last)
        return self._with_body(folded, threshold, (windows[0], measured) if len(windows) == 1 else None)

    def _with_body(self, body: nn.Module | None, threshold: float,
                   seen: tuple[np.ndarray, dict[str, torch.Tensor]] | None = None) -> Detector:
        """This detector running `body` as its backbone body (None: the model's own, per-tile statistics) at score
        `threshold`; seen: an input and the body's output on it, reused when that input comes to be detected."""
        if body is None and not self.slide_calibrated and threshold == self.score_threshold:
            return self
        other = copy.copy(self)
        other.network = self.network.with_body(body)
        other.seen_input = seen
        other.score_threshold = threshold
        return other

    def _seen_body_output(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor] | None:
        """The body's output on `images` when they are the one input it has already run on (calibrated), else None."""
        if self.seen_input is None or len(images) != 1:
            return None
        seen, output = self.seen_input
        image = images[0]
        if not isinstance(image, np.ndarray):   # a PinnedTile: a GPU, where the body pass costs little
            return None
        return output if image.shape == seen.shape and np.array_equal(image, seen) else None

    def detect(self, images: Sequence[np.ndarray], tiles: Sequence[TileSpec] | None = None,
               scale: float = 1.0) -> list[TileDetections]:
        """The TileDetector's detect: `images` are the network input of `tiles` (resampled by `scale` network px
        per slide px); each tile's detections come back in its read box at slide resolution, and boxes that cannot
        hold a cell the tile owns skip the mask branch. Without tiles: detect_images(images) (scale 1)."""
        if tiles is None:
            return self.detect_images(images, scale)
        frame_shapes, owned_boxes = detection_frames(tiles)
        return self.detect_images(images, scale, frame_shapes=frame_shapes, owned_boxes=owned_boxes)

    @torch.inference_mode()
    def detect_images(self, images: Sequence[np.ndarray], scale: float = 1.0, *,
                      frame_shapes: Sequence[tuple[int, int]] | None = None,
                      owned_boxes: Sequence[Box] | None = None) -> list[TileDetections]:
        """images: float32 (3, h, w) arrays, already normalised (see planning/intensity.py), or PinnedTiles
        (`prepare`); any sizes.

        frame_shapes: per image, the (height, width) its detections come back in: when the images were resampled by
        `scale` (network px per slide px), their tiles' read boxes at slide resolution; masks are then pasted
        straight at that resolution, so a cell is never blocky from a nearest-neighbour upsampling of a thresholded
        mask. None: each image's own shape (scale must be 1).
        owned_boxes: per image, the box (in its frame) that the cells its tile keeps are centred in (with a margin):
        boxes that cannot reach it skip the mask branch and are not returned. None: every cell is returned.
        """
        if frame_shapes is None and scale != 1.0:
            raise ParameterError(f"expected the frame shapes of images resampled by {scale}, found none")
        results: list[TileDetections | None] = [None] * len(images)
        # Only same-size tiles share a forward pass: torchvision zero-pads a batch to its largest image, and
        # with GroupNorm the padding shifts every feature of the smaller tile, so a cell's mask would depend
        # on which tiles happened to share its batch (and so on the tissue filter and the tile size).
        by_shape: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape), []).append(i)
        per_pass = 1 if self.streams is not None else self.batch_size
        chunks = [indices[start:start + per_pass] for indices in by_shape.values()
                  for start in range(0, len(indices), per_pass)]

        def detect_chunk(chunk: list[int]) -> list[TileDetections]:
            with torch.inference_mode():    # thread-local: a stream's thread needs it too
                try:
                    return self._detect_batch([images[i] for i in chunk], scale,
                                              None if frame_shapes is None else [frame_shapes[i] for i in chunk],
                                              None if owned_boxes is None else [owned_boxes[i] for i in chunk])
                except torch.OutOfMemoryError:
                    if len(chunk) == 1:
                        raise ParameterError(
                            f"expected one tile of {'x'.join(map(str, images[chunk[0]].shape[-2:]))} px to fit the "
                            f"GPU's memory, found it does not: use a smaller --tile-size, or --device cpu") from None
            # A GPU shared with other work, or smaller than the batch needs: halves, for this slide's later
            # passes too. The cells are the same (a tile's forward pass never depends on its batch: see above).
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = (len(chunk) + 1) // 2
            if half < self.batch_size:
                log.warning("the GPU ran out of memory at %d tiles a pass: %d from now on", len(chunk), half)
                self.batch_size = half
            return detect_chunk(chunk[:half]) + detect_chunk(chunk[half:])
        found = (self.streams.map(detect_chunk, chunks) if self.streams is not None and len(chunks) > 1
                 else [detect_chunk(chunk) for chunk in chunks])
        for chunk, detections in zip(chunks, found):
            for i, det in zip(chunk, detections):
                results[i] = det
        return results

    def _detect_batch(self, images: Sequence[np.ndarray], scale: float,
                      frame_shapes: Sequence[tuple[int, int]] | None,
                      owned_boxes: Sequence[Box] | None) -> list[TileDetections]:
        """One forward pass over same-size images (network input, or PinnedTiles)."""
        with record_function("cellseg.input"):
            batch = [self._on_device(im) for im in images]
        # (x0, y0, x1, y1) in network px, as torchvision sees boxes (detection.rcnn_parts.TileRoIHeads.detect)
        owned_regions = None if owned_boxes is None else [
            (b.col0 * scale, b.row0 * scale, b.col1 * scale, b.row1 * scale) for b in owned_boxes]
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            outputs = self.network(batch, owned_regions, body_output=self._seen_body_output(images),
                                   mask_score=self.score_threshold)
        frames = [image.shape[-2:] for image in batch] if frame_shapes is None else frame_shapes
        with record_function("cellseg.paste"):       # masks pasted, thresholded, and brought to the host
            # the heads gave masks only to boxes at the threshold (mask_score): none to drop
            return self._to_tile_detections_of(outputs, frames, scale, thresholded=True)

    def _to_tile_detections(self, out: dict, height: int, width: int, scale: float = 1.0) -> TileDetections:
        """One image's network output (TileNetwork) as TileDetections in its height x width frame."""
        return self._to_tile_detections_of([out], [(height, width)], scale)[0]

    def _to_tile_detections_of(self, outputs: Sequence[dict], frames: Sequence[tuple[int, int]], scale: float,
                               thresholded: bool = False) -> list[TileDetections]:
        """A pass's network outputs as TileDetections, image i's in its frames[i] (height, width): the detections
        scoring at the threshold with their masks pasted, those from the candidate floor up as boxes (`_below_of`).
        The pass's masks are pasted together and its numbers cross to the host in one copy: each crossing makes
        the host wait for the device (issue 50). thresholded: the outputs' masked detections all score at the
        threshold already (no boolean indexing, which waits for the device too)."""
        if not thresholded:
            outputs = [dict(out, **{key: out[key][out["scores"] >= self.score_threshold]
                                    for key in ("boxes", "masks", "scores", "labels")}) for out in outputs]
        per_image = [len(out["scores"]) for out in outputs]
        boxes_xyxy, probs, scores, labels = (torch.cat([out[key] for out in outputs])
                                             for key in ("boxes", "masks", "scores", "labels"))
        wants_below = self.candidate_floor is not None and all("below_boxes" in out for out in outputs)
        image_of = np.repeat(np.arange(len(outputs)), per_image)
        heights, widths = (np.asarray([f[axis] for f in frames], np.int64)[image_of] for axis in (0, 1))
        boxes, masks, kept = paste_masks_at_box_size(boxes_xyxy, probs, heights, widths, self.mask_threshold, scale)
        # scores, labels and the boxes below the threshold: one copy to the host
        numbers = [scores.float(), labels.float()]
        below_per_image = [len(out["below_scores"]) for out in outputs] if wants_below else []
        if wants_below:      # the masks' boxes were scaled when pasted; these are scaled here
            numbers += [torch.cat([out["below_scores"] for out in outputs]).float(),
                        torch.cat([out["below_boxes"] for out in outputs]).float().reshape(-1) / scale]
        host = torch.cat(numbers).cpu().numpy()
        n = len(scores)
        scores_np, labels_np = host[:n].astype(np.float32), host[n:2 * n].astype(np.int64)
        belows = self._below_of(host[2 * n:], below_per_image, frames) if wants_below else None
        kept_image = image_of[kept]
        results = []
        for i in range(len(outputs)):
            mine = np.flatnonzero(kept_image == i)
            results.append(TileDetections(boxes[mine], [masks[k] for k in mine.tolist()],
                                          scores_np[kept[mine]], labels_np[kept[mine]],
                                          no_candidates() if belows is None else belows[i]))
        return results

    def _below_of(self, numbers: np.ndarray, per_image: list[int], frames: Sequence[tuple[int, int]]
                  ) -> list[np.ndarray]:
        """Per image, the boxes scoring from the candidate floor up to the threshold (no masks): (K, 5) float32 row0,
        col0, row1, col1 (clipped to the image's frame), score; `numbers`: the pass's below scores, then its below
        boxes (xyxy) flattened."""
        total = sum(per_image)
        scores_all, xyxy_all = numbers[:total], numbers[total:].reshape(-1, 4)
        out, start = [], 0
        for count, (height, width) in zip(per_image, frames):
            scores, xyxy = scores_all[start:start + count], xyxy_all[start:start + count]
            start += count
            keep = (scores >= self.candidate_floor) & (scores < self.score_threshold)
            xyxy = xyxy[keep]
            below = np.empty((len(xyxy), 5), np.float32)
            below[:, 0] = np.clip(xyxy[:, 1], 0, height)
            below[:, 1] = np.clip(xyxy[:, 0], 0, width)
            below[:, 2] = np.clip(xyxy[:, 3], 0, height)
            below[:, 3] = np.clip(xyxy[:, 2], 0, width)
            below[:, 4] = scores[keep]
            out.append(below)
        return out

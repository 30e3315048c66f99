"""A count's journal: the unfinished work of one slide, kept so that a killed run can be resumed (`--resume`).

    .NAME.partial/            beside the result folder NAME (results.partial_folder), the same name in every run
        journal.json          what the work belongs to: cellseg version, slide file, protocol, model, options
        lock                  held (flock) by the run writing here; a killed process releases it
        plan.npz              the slide plan (planning.SlidePlan): every band is detected with the same one
        band-00003.npz        band 3's owned cells per analysed tile (merge.owned_instances), written atomically
        result/               the result files, written by the final step, then committed to NAME

Nothing here is ever presented as a result: the folder is hidden, and NAME only ever receives a complete result
(results.commit_output). A journal is trusted only when its fingerprint equals this run's (same cellseg version,
slide file, protocol, model and options; the protocol's export settings may differ: they choose the files the
bands become); anything else is refused with a one-line error, never mixed. Files are
numpy archives read with allow_pickle=False and JSON: nothing is unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import CellsegError, JournalError, OutputError, UnreadableRegionError, WriteError
from ..geometry import Band, Box, Instances, no_candidates, plan_tiles
from ..planning import IntensityRange, NetworkInput, Regions, Scale, SlidePlan
from ..results import (
    RESULT_MARKER,
    atomic_write_bytes,
    commit_output,
    first_missing,
    free_space,
    partial_folder,
    prepare_parent,
    remove_made_parents,
)
from ..slides import SlideInfo, UnreadableRegion
from ..tissue import TissueMask

log = logging.getLogger(__name__)

HEADER, PLAN, LOCK, RESULT = "journal.json", "plan.npz", "lock", "result"
_BAND = re.compile(r"^band-(\d+)\.npz$")
FORMAT = 1


# --------------------------------------------------------------------------- what a journal belongs to

def fingerprint(info: SlideInfo, settings: dict) -> dict:
    """What a journal (or a finished result) must match to be reused: cellseg's version, the slide file (path,
    size, modification time; a folder's entries) and geometry, and `settings` (counter.CellCounter.settings:
    the protocol, model and options that change the cells)."""
    return {"cellseg_version": __version__, "slide": slide_signature(info), **settings}


def slide_signature(info: SlideInfo) -> dict:
    path = Path(info.path).resolve()
    stat = path.stat()
    signature = {"path": str(path), "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns}
    if path.is_dir():   # OME-Zarr, a DICOM series: their entries change when the slide is rewritten
        entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path))
        signature["entries_sha256"] = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    signature.update(height=info.height, width=info.width, channels=info.n_channels, dtype=str(info.dtype))
    return signature


# Protocol sections a journal's bands do not depend on: the bands hold detected cells, the files they become are
# chosen and written by the final step, so a resumed count may pick other ones (fewer, after a full disk).
_NOT_IN_BANDS = ("export",)


def bands_fingerprint(print_: dict) -> dict:
    """`print_` without what the bands of a journal do not depend on (_NOT_IN_BANDS)."""
    protocol = {k: v for k, v in (print_.get("protocol") or {}).items() if k not in _NOT_IN_BANDS}
    return {**print_, "protocol": protocol} if "protocol" in print_ else print_


def difference(there: dict, here: dict) -> str | None:
    """The first way two fingerprints differ, in words (None: they are the same)."""
    if there == here:
        return None
    if there.get("cellseg_version") != here.get("cellseg_version"):
        return f"cellseg {there.get('cellseg_version')} there, {here.get('cellseg_version')} here"
    a, b = there.get("slide") or {}, here.get("slide") or {}
    if a.get("path") != b.get("path"):
        return f"another slide ({a.get('path')} there, {b.get('path')} here)"
    if a != b:
        return f"the slide {b.get('path')} changed since (its size or modification time differs)"
    for key in sorted(set(there) | set(here)):
        if there.get(key) != here.get(key):
            return f"other {key} settings ({_first_change(there.get(key), here.get(key))})"
    return "another run"


def _first_change(a, b, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_change(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
    label = f"{where}: " if where else ""
    return f"{label}{a!r} there, {b!r} here"


# --------------------------------------------------------------------------- the journal of one result folder

class Journal:
    """The partial folder of one result folder, held (locked) by this run. Use `open`, then `commit` the result
    written into `result_folder()`, or `end(error)`: a bad input (CellsegError) discards the work, anything else
    (a crash, Ctrl-C, a lost cluster), a damaged tile or a result file that could not be written (no space left)
    met after finished bands keeps it for --resume."""

    def __init__(self, final: Path, folder: Path, print_: dict, band_rows: int | None, made: Path | None,
                 lock_fd: int, kept_bands: int):
        self.final, self.folder, self.fingerprint = final, folder, print_
        self.band_rows, self.kept_bands = band_rows, kept_bands
        self._made, self._lock_fd = made, lock_fd
        self._keep = False      # the finished result failed to move into place: kept for --resume whatever the error

    @classmethod
    def open(cls, final: Path, print_: dict, *, resume: bool, band_rows: int | None = None) -> Journal:
        """The journal for result folder `final`, fingerprint `print_`: a new one, or with resume=True the
        unfinished one of an earlier run (its band split is kept). Refused (one line) when `final` holds files
        that are not cellseg's, when another run holds the journal, when an unfinished count exists and resume
        is False, or when it belongs to another slide, protocol, model or cellseg version (the protocol's export
        settings aside: a resumed count may write other files than the run it resumes)."""
        final = Path(os.path.abspath(final))
        made = first_missing(final.parent)
        prepare_parent(final)
        folder = partial_folder(final)
        try:
            # made here, or there already: decided by the mkdir itself, for two counts started at once (the one that
            # only looked first would remove the other's folder when refused its lock)
            folder.mkdir()
            fresh = True
        except FileExistsError:
            fresh = False
        except OSError as exc:
            raise OutputError(f"cannot write results into {folder.parent}: {exc.strerror or exc}") from exc
        lock_fd = _lock(folder, final)
        try:
            header = None if fresh else _read_json(folder / HEADER)
            if header is None and not fresh and (folder / HEADER).exists():
                # written atomically: damaged from outside (a disk error, a copy cut short); its bands are kept
                raise JournalError(f"expected a readable {HEADER} in {folder}, found a damaged one; remove that "
                                   f"folder to start over")
            if header is not None:
                done = len(done_bands(folder))
                if not resume:
                    raise JournalError(
                        f"expected no unfinished count of {final}, found one in {folder} ({done} band(s) done): "
                        f"add --resume to continue it, or remove that folder to start over")
                there = header.get("fingerprint") or {}
                changed = difference(bands_fingerprint(there), bands_fingerprint(print_))
                if changed is not None:
                    raise JournalError(f"expected the unfinished count in {folder} to be of this slide with the same "
                                       f"protocol, model and cellseg version, found {changed}; remove that folder "
                                       f"to start over")
                load_plan(folder)       # damaged: refused in one line, the folder kept (as the message says)
                if there != print_:     # other files asked for: the header (and so run.json) says this run's
                    atomic_write_bytes(folder / HEADER, json.dumps({**header, "fingerprint": print_},
                                                                   indent=2).encode())
                    log.info("resuming %s with other export settings (%s)", final, difference(there, print_))
                for index in sorted(done_bands(folder)):
                    if not _intact(band_path(folder, index)):    # a cache of detections: detected again
                        log.warning("band %d of %s in %s is damaged: it is detected again", index, final, folder)
                        band_path(folder, index).unlink()
                done = len(done_bands(folder))
                log.info("resuming %s: %d band(s) done", final, done)
                return cls(final, folder, print_, header.get("band_rows"), made, lock_fd, done)
            # New, or left by a run killed before it wrote its header: nothing in it is worth keeping.
            for entry in folder.iterdir():
                if entry.name != LOCK:
                    _remove(entry)
            atomic_write_bytes(folder / HEADER, json.dumps({"format": FORMAT, "fingerprint": print_,
                                                     "band_rows": band_rows}, indent=2).encode())
            return cls(final, folder, print_, band_rows, made, lock_fd, 0)
        except BaseException:
            os.close(lock_fd)
            if fresh:
                shutil.rmtree(folder, ignore_errors=True)
                remove_made_parents(final, made)
            raise

    def commit(self) -> None:
        """Move the finished result into place (results.commit_output), then drop the journal. The header goes
        first: a run killed in between leaves no journal that a later run would take for unfinished work. A move
        that fails (files added to the earlier result meanwhile, a permission taken away) puts the header back and
        keeps the whole journal: --resume writes the result again from its bands."""
        header = self.folder / HEADER
        saved = header.read_bytes()
        header.unlink()
        try:
            commit_output(self.folder / RESULT, self.final)
        except BaseException:
            self._keep = True
            try:
                atomic_write_bytes(header, saved)
            except CellsegError as e:
                log.error("could not put back the journal's header in %s (%s): a rerun will start over",
                          self.folder, e)
            raise
        shutil.rmtree(self.folder, ignore_errors=True)
        self._release()

    def end(self, error: BaseException | None) -> None:
        """Stop without a result. `error` a CellsegError (bad input: resuming cannot help) or None: the work is
        discarded and the folders made for it removed; anything else, or damaged pixel data (UnreadableRegionError)
        or a result file that could not be written (WriteError: no space left, no permission) after finished
        bands, or a finished result that could not be moved into place (commit): it is kept for --resume."""
        # A damaged tile is a bad input too, but the bands before it are sound: kept (if any) for --resume
        # --skip-unreadable. A full disk: kept for --resume once there is room.
        keep = self._keep or (isinstance(error, (UnreadableRegionError, WriteError)) and bool(done_bands(self.folder)))
        if error is None or (isinstance(error, CellsegError) and not keep):
            shutil.rmtree(self.folder, ignore_errors=True)
            remove_made_parents(self.final, self._made)
        else:
            # a write that failed: the bands do not depend on the files chosen, so fewer may finish it
            how = (" once there is room, or with fewer files (--outputs, e.g. cells.csv)"
                   if isinstance(error, WriteError) else "")
            freed = ""
            if isinstance(error, WriteError) and not self._keep:
                # the result files written so far (label pyramids, GeoJSON: gigabytes on a whole slide) are of no
                # use to --resume, which writes them again from the bands: removed, so the disk is not left full
                shutil.rmtree(self.folder / RESULT, ignore_errors=True)
                freed = f" (the result files written so far removed: {free_space(self.folder)})"
            log.warning("kept %d finished band(s) of %s in %s%s: rerun with --resume to continue%s",
                        len(done_bands(self.folder)), self.final, self.folder, freed, how)
        self._release()

    def told(self, error: BaseException) -> BaseException:
        """`error` as the user reads it: a result file that could not be written (WriteError) named in the result
        folder, not in this journal's staging folder for it (removed by end)."""
        return error.seen_from(self.folder / RESULT, self.final) if isinstance(error, WriteError) else error

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._lock_fd is not None:
            self.end(exc)

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)    # flock's "another process holds it"


def _lock(folder: Path, final: Path) -> int:
    """Hold `folder`'s lock file for this process (released when it ends, however it ends)."""
    try:
        import fcntl
    except ImportError:   # not POSIX: no lock (two runs on one result folder are the user's to avoid)
        fcntl = None
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot write results into {folder}: {exc.strerror or exc}") from exc
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _HELD:
                # a file system without locks (Lustre mounted without flock, NFS without its lock daemon): every
                # count there would be refused as if another held it; two counts into one folder are the user's
                # to avoid there, as where there is no fcntl
                log.warning("cannot lock %s (%s): nothing keeps two counts into %s apart on this file system",
                            folder / LOCK, exc.strerror or exc, final)
            else:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"expected no other cellseg count writing {final}, found one (process {holder}) "
                                  f"working in {folder}") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fresh_result_folder(folder: Path) -> Path:
    """The empty folder the final step writes the result files into (a retried final step starts afresh)."""
    result = Path(folder) / RESULT
    shutil.rmtree(result, ignore_errors=True)
    result.mkdir()
    return result


def complete_result(final: Path, print_: dict) -> dict | None:
    """The summary of the finished result in `final` when it was made from the same slide, protocol, model and
    cellseg version (fingerprint `print_`; the protocol's export settings may differ: the same cells, other files,
    said in a warning) and no unfinished count of `final` lies beside it; None when there is no
    finished result there, or when an unfinished count lies beside it (a recount into an earlier result's folder,
    interrupted: Journal.open resumes it, replacing that result, or refuses it in one line); JournalError when there
    is one made otherwise and nothing to resume."""
    final = Path(final)
    if not (final / RESULT_MARKER).is_file():
        return None
    run, summary = _read_json(final / "run.json"), _read_json(final / "summary.json")
    if run is None or summary is None:
        return None
    # The unfinished count decides, whatever the result's settings: skipped, it would stay there, and a count
    # without --resume would be refused for it ("add --resume") again and again.
    if (partial_folder(final) / HEADER).exists():
        return None
    there = run.get("fingerprint") or {}
    changed = difference(bands_fingerprint(there), bands_fingerprint(print_))
    if changed is not None:
        raise JournalError(f"expected the result in {final} to be of this slide with the same protocol, model and "
                           f"cellseg version, found {changed}; rerun without --resume to replace it")
    if there != print_:     # the same cells in other files (a batch finished with fewer after a full disk)
        log.warning("the complete result in %s was written with %s: kept as it is (rerun without --resume to "
                    "write it again)", final, difference(there, print_))
    return summary


# --------------------------------------------------------------------------- the plan

def save_plan(folder: Path, plan: SlidePlan, info: SlideInfo) -> None:
    """plan.npz: the arrays, and every other field as JSON (floats round-trip exactly)."""
    meta = {"height": info.height, "width": info.width, "channel": plan.network.channel,
            "channel_names": plan.channel_names, "thumb_factor": plan.thumb_factor,
            "intensity": asdict(plan.network.intensity), "scale": asdict(plan.network.scale),
            "gray": plan.network.gray, "tile_px": plan.tile_px, "halo_px": plan.halo_px, "windows": [list(map(int, b)) for b in plan.windows],
            "tissue": {k: v for k, v in asdict(plan.tissue).items() if k != "mask"},
            "regions": plan.regions.to_json() if plan.regions is not None else None,
            "cell_expansion_px": plan.cell_expansion_px}
    _save_npz(folder / PLAN, meta=np.array(json.dumps(meta)), thumbnail=plan.thumbnail,
              tissue_mask=plan.tissue.mask, keep=np.asarray(plan.keep, bool))


def load_plan(folder: Path) -> SlidePlan | None:
    """The journaled plan, None when there is none yet."""
    arrays = _load_npz(Path(folder) / PLAN)
    if arrays is None:
        return None
    meta = json.loads(str(arrays["meta"]))
    tiles = plan_tiles(meta["height"], meta["width"], meta["tile_px"], meta["halo_px"])
    network = NetworkInput(meta["channel"], IntensityRange(**meta["intensity"]), Scale(**meta["scale"]), meta["gray"])
    return SlidePlan(network, meta["channel_names"], arrays["thumbnail"], meta["thumb_factor"],
                     TissueMask(arrays["tissue_mask"], **meta["tissue"]), meta["tile_px"], meta["halo_px"], tiles,
                     arrays["keep"].tolist(), [Box(*b) for b in meta["windows"]],
                     cell_expansion_px=meta.get("cell_expansion_px", 0.0),
                     regions=Regions.from_json(meta["regions"]) if meta.get("regions") else None)


# --------------------------------------------------------------------------- bands

def band_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"band-{index:05d}.npz"


def done_bands(folder: Path) -> set[int]:
    """Indices of the bands whose files are complete (they are written atomically)."""
    try:
        return {int(m.group(1)) for e in os.scandir(folder) if (m := _BAND.match(e.name))}
    except OSError:
        return set()


UNREADABLE = "unreadable.json"


def save_unreadable(folder: Path, regions: list[UnreadableRegion]) -> None:
    """The damaged regions met so far (--skip-unreadable), saved with each band so a resumed count lists them too."""
    atomic_write_bytes(Path(folder) / UNREADABLE, json.dumps([r.to_dict() for r in regions]).encode())


def load_unreadable(folder: Path) -> list[UnreadableRegion]:
    try:
        records = json.loads((Path(folder) / UNREADABLE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise JournalError(f"expected a readable {UNREADABLE} in {folder}, found {e}; remove {folder} to start "
                           f"over") from e
    return [UnreadableRegion(Box(*r["box"]), r["error"]) for r in records]


def save_band(folder: Path, band: Band, owned: dict[int, Instances]) -> None:
    """Band `band`'s owned cells: tile index -> Instances for every analysed tile of the band (none may be missing:
    a tile with no cells has an empty entry). Masks are stored bit-packed."""
    tiles = np.array(sorted(owned), np.int64)
    cells = Instances.concat([owned[int(t)] for t in tiles])
    flat = (np.concatenate([m.reshape(-1) for m in cells.masks]).astype(bool, copy=False) if len(cells)
            else np.zeros(0, bool))
    below_tile = np.concatenate([np.full(len(owned[int(t)].below), t, np.int64) for t in tiles]) if len(tiles) \
        else np.zeros(0, np.int64)
    _save_npz(band_path(folder, band.index), band=np.array([band.index, band.row0, band.row1], np.int64),
              tiles=tiles, boxes=cells.boxes, scores=cells.scores, class_ids=cells.class_ids,
              tile_index=cells.tile_index, cut=cells.cut, masks=np.packbits(flat), mask_bits=np.int64(flat.size),
              below=cells.below, below_tile=below_tile)


def load_band(folder: Path, band: Band) -> dict[int, Instances]:
    """What save_band wrote for `band`: tile index -> its owned cells."""
    path = band_path(folder, band.index)
    arrays = _load_npz(path)
    if arrays is None or arrays["band"].tolist() != [band.index, band.row0, band.row1]:
        raise JournalError(f"expected {path} to hold band {band.index} (tile rows {band.row0}-{band.row1 - 1}), "
                           f"found {'nothing readable' if arrays is None else 'another band'}; remove "
                           f"{Path(folder)} to start over")
    boxes = arrays["boxes"]
    sizes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    flat = np.unpackbits(arrays["masks"], count=int(arrays["mask_bits"])).view(bool)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    masks = [flat[starts[i]:starts[i + 1]].reshape(int(h), int(w))
             for i, (h, w) in enumerate(zip(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))]
    cells = Instances(boxes, masks, arrays["scores"], arrays["class_ids"], arrays["tile_index"], arrays["cut"])
    below = arrays.get("below", no_candidates())       # the below-threshold candidates (Instances.below) per tile
    below_tile = arrays.get("below_tile", np.zeros(0, np.int64))
    return {int(t): replace(cells.take(np.flatnonzero(cells.tile_index == t)), below=below[below_tile == t])
            for t in arrays["tiles"]}


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    import io
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _intact(path: Path) -> bool:
    """Whether the numpy archive at `path` reads back whole (every member's checksum)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error):
        return False


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        # opened here: np.load leaves the file open when it is not an archive
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:   # truncated, bit-flipped
        raise JournalError(f"expected a readable journal file at {path}, found a damaged one ({exc}); remove "
                           f"{path.parent} to start over") from exc

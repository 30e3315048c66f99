"""Safe, atomic result folders.

A run writes everything into a hidden staging folder beside the requested output folder and only
then swaps it in, so the output folder always holds either the previous complete result, the new
complete result, or (after a crash mid-swap) nothing plus the previous result in a hidden `.old`
sibling — never a half-written mix. We only ever replace folders that are empty or that we made
ourselves (they carry RESULT_MARKER): a user's folder of other files is never touched.

Sibling names, for an output folder NAME:  `.NAME.tmp-<pid>-<random>` (staging),
`.NAME.old-<pid>-<random>` (the previous result during the swap). Leftovers of crashed runs are
removed once the process that made them is gone.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError, WriteError

log = logging.getLogger(__name__)

RESULT_MARKER = ".cellseg-result"


def _canonical(final: Path) -> Path:
    """Absolute path; a symlink to a folder is followed, so we replace the folder, not the link."""
    final = Path(os.path.abspath(final))
    return final.resolve() if final.is_symlink() else final


def _sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to another user
        return True
    except OSError:  # e.g. an out-of-range pid: cannot belong to a live process
        return False
    return True


def _remove_stale(final: Path, kinds: tuple[str, ...]) -> None:
    """Delete `.NAME.<kind>-<pid>-*` siblings of `final` whose process is dead (crashed runs)."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.({'|'.join(kinds)})-(\d+)-[0-9a-f]+$")
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(m.group(2))):
            log.info("removing %s left by an earlier interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _check_replaceable(final: Path) -> None:
    """Raise OutputError unless `final` is missing, an empty folder or an earlier cellseg result."""
    if not final.exists():
        if final.is_symlink():
            raise OutputError(f"expected a folder or nothing at {final}, found a broken symlink")
        return
    if not final.is_dir():
        raise OutputError(f"expected a folder at {final}, found a file; choose another output "
                          f"folder with -o")
    try:
        names = sorted(p.name for p in final.iterdir())
    except OSError as exc:
        raise OutputError(f"cannot list the output folder {final}: {exc.strerror or exc}") from exc
    if not names:
        return
    if RESULT_MARKER in names:
        # The marker lists what cellseg wrote; anything added since (a user's notes) is not ours to delete.
        try:
            ours = set((final / RESULT_MARKER).read_text(encoding="utf-8").split("\n")) | {RESULT_MARKER}
        except (OSError, UnicodeDecodeError) as exc:
            raise OutputError(f"cannot read {final / RESULT_MARKER}: {exc}") from exc
        added = [n for n in names if n not in ours]
        if not added:
            return
        raise OutputError(
            f"expected an earlier cellseg result at {final} to hold only cellseg's files, found {len(added)} "
            f"added since (e.g. {added[0]}); move them or choose another output folder with -o")
    raise OutputError(
        f"expected an empty folder or an earlier cellseg result at {final}, found {len(names)} "
        f"files that are not cellseg's (e.g. {names[0]}); choose another output folder with -o")


def prepare_output(final: Path) -> Path:
    """Check `final` can be (re)placed and return a fresh, empty staging folder beside it.

    `final` may be missing (its parents are created), an empty folder, or an earlier cellseg
    result (it is replaced at commit). Anything else, or a parent we cannot write, raises
    OutputError naming the folder. Stale staging folders of dead runs for the same name are removed.
    """
    final = _canonical(final)
    prepare_parent(final)
    _remove_stale(final, ("tmp",))
    staging = _sibling(final, "tmp")
    try:
        staging.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write results into {final.parent}: {exc.strerror or exc}") from exc
    log.debug("staging results for %s in %s", final, staging)
    return staging


def partial_folder(final: Path) -> Path:
    """Where a journaled count of `final` keeps its unfinished work: `.NAME.partial` beside it, the same name in
    every run (a resumed run finds it), hidden, and never mistaken for a result."""
    final = _canonical(final)
    return final.parent / f".{final.name}.partial"


def prepare_parent(final: Path) -> None:
    """Check that `final` can be (re)placed and that its parent folder can be written, creating it if needed.

    `final` may be missing, an empty folder, or an earlier cellseg result; anything else, or a parent we cannot
    write, raises OutputError naming the folder."""
    final = _canonical(final)
    _check_replaceable(final)
    parent = final.parent
    blocker = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"expected a folder at {blocker} to hold results, found a file")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {parent} for results: "
                          f"{exc.strerror or exc}") from exc
    # os.access answers by permission bits (root passes them all); the mkdir below is the real test.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write results into {parent}: permission denied")


def commit_output(staging: Path, final: Path) -> None:
    """Mark `staging` as a cellseg result and move it to `final`, replacing a previous result.

    Order: marker into staging; `final` -> hidden `.old` sibling; staging -> `final`; delete `.old`.
    A crash between the renames leaves `final` missing and the previous result in `.old` (removed
    by the next successful commit once this process is gone). If the second rename fails, the
    previous result is moved back and OutputError raised.
    """
    final = _canonical(final)
    staging = Path(staging)
    try:
        names = sorted(p.name for p in staging.iterdir() if p.name != RESULT_MARKER)
        (staging / RESULT_MARKER).write_text("\n".join(names) + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write into the staging folder {staging}: "
                          f"{exc.strerror or exc}") from exc
    # Re-check: the folder may have been filled by someone else while we worked.
    _check_replaceable(final)
    old = None
    try:
        if final.exists():
            old = _sibling(final, "old")
            os.rename(final, old)
        os.rename(staging, final)
    except OSError as exc:
        if old is not None and old.exists() and not final.exists():
            try:
                os.rename(old, final)  # put the previous result back
            except OSError:
                log.error("the previous results for %s are kept in %s", final, old)
        raise OutputError(f"cannot move the results into {final}: {exc.strerror or exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            log.warning("could not fully remove the previous results in %s", old)
    _remove_stale(final, ("tmp", "old"))
    log.info("results written to %s", final)


def abort_output(staging: Path) -> None:
    """Remove the staging folder; a folder already gone is fine."""
    shutil.rmtree(staging, ignore_errors=True)
    if Path(staging).exists():
        log.warning("could not fully remove the staging folder %s", staging)


# What only writing meets: a full disk or quota, a file too large, a file system gone read-only, a permission
# taken away mid-run. Such a failure keeps a journaled count's finished bands for --resume (run/journal.py).
WRITING_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def write_error(what: str, folder: Path, error: OSError) -> WriteError:
    """A WriteError for an OSError met writing `what` into `folder`: what failed, why, and the space left there."""
    return WriteError(what, folder, error.strerror or str(error), free_space(folder))


def free_space(folder: Path) -> str:
    """"N MB free there": the space left on `folder`'s file system, in words."""
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:,.1f} MB free there"
    except OSError:
        return "free space unknown"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` so readers see the old file or the new one, never a part."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a part (a killed writer leaves a
    hidden temporary file at most).

    The temporary file is created in the same folder (os.replace is only atomic within one file
    system) with mode 0o666 minus the umask, like a plain open() would give.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITING_ERRNOS:
            raise write_error(path.name, path.parent, exc) from exc
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


@contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Yield a staging folder for results destined for `final`; commit on success.

    On any exception (KeyboardInterrupt included) the staging folder is removed, the previous
    result at `final` is left untouched, and the exception propagates (a WriteError naming `final`'s files).
    """
    made = first_missing(_canonical(final).parent)
    staging = prepare_output(final)
    try:
        yield staging
        commit_output(staging, final)
    except BaseException as e:
        abort_output(staging)
        remove_made_parents(final, made)
        if isinstance(e, WriteError):
            raise e.seen_from(staging, final) from e
        raise


def remove_made_parents(final: Path, made: Path | None) -> None:
    """Remove the (empty) folders created to hold `final`, from its parent up to `made` (first_missing's answer
    before they were created): a failed run leaves the disk as it was."""
    if made is None:
        return
    folder = _canonical(final).parent
    while folder != made.parent:
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent


def first_missing(folder: Path) -> Path | None:
    """The outermost ancestor of `folder` (or itself) that does not exist yet, if any."""
    missing = None
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing

"""Result folders: only empty folders or our own results are replaced, and atomically."""

import os
import stat
import subprocess
import sys

import pytest

from cellseg.errors import OutputError
from cellseg.results import RESULT_MARKER, abort_output, atomic_write_text, commit_output, prepare_output, staged_output
from cellseg.results import folder as resultdir


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden_siblings(final):
    return sorted(p.name for p in final.parent.iterdir() if p.name.startswith(f".{final.name}."))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_fresh_output_in_missing_parents(tmp_path):
    final = tmp_path / "a" / "b" / "out"
    with staged_output(final) as staging:
        assert staging.parent == final.parent and staging.name.startswith(".out.tmp-")
        assert not final.exists()  # nothing appears at `final` before the commit
        (staging / "cells.csv").write_text("id\n")
    assert sorted(p.name for p in final.iterdir()) == [RESULT_MARKER, "cells.csv"]
    assert _hidden_siblings(final) == []


def test_empty_folder_is_accepted(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    with staged_output(final) as staging:
        (staging / "summary.json").write_text("{}")
    assert (final / "summary.json").read_text() == "{}"
    assert (final / RESULT_MARKER).exists()


def test_replacing_previous_result_leaves_nothing_stale(tmp_path):
    final = tmp_path / "out"
    with staged_output(final) as staging:
        (staging / "old_only.txt").write_text("first run")
        (staging / "cells.csv").write_text("first")
    with staged_output(final) as staging:
        (staging / "cells.csv").write_text("second")
    assert _snapshot(final) == {RESULT_MARKER: b"cells.csv\n", "cells.csv": b"second"}
    assert _hidden_siblings(final) == []


def test_foreign_folder_is_refused_and_untouched(tmp_path):
    final = tmp_path / "thesis"
    final.mkdir()
    (final / "notes.txt").write_text("my notes")
    (final / "data.csv").write_text("1,2")
    before = _snapshot(final)
    with pytest.raises(OutputError) as err:
        prepare_output(final)
    msg = str(err.value)
    assert str(final) in msg and "found 2 files" in msg and "data.csv" in msg and "-o" in msg
    assert _snapshot(final) == before
    assert _hidden_siblings(final) == []  # no staging folder was created


def test_file_at_final_is_refused(tmp_path):
    final = tmp_path / "out"
    final.write_text("not a folder")
    with pytest.raises(OutputError, match="found a file"):
        prepare_output(final)
    assert final.read_text() == "not a folder"


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_failure_inside_keeps_previous_result(tmp_path, exc_type):
    final = tmp_path / "out"
    with staged_output(final) as staging:
        (staging / "cells.csv").write_text("good results")
    before = _snapshot(final)
    with pytest.raises(exc_type):
        with staged_output(final) as staging:
            (staging / "cells.csv").write_text("half written")
            raise exc_type("crash")
    assert _snapshot(final) == before
    assert _hidden_siblings(final) == []


def test_failed_swap_restores_previous_result(tmp_path, monkeypatch):
    final = tmp_path / "out"
    with staged_output(final) as staging:
        (staging / "cells.csv").write_text("good results")
    before = _snapshot(final)
    staging = prepare_output(final)
    (staging / "cells.csv").write_text("new")
    real_rename = os.rename

    def rename(src, dst):  # the first rename (final -> .old) works, the second fails
        if str(src) == str(staging):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(resultdir.os, "rename", rename)
    with pytest.raises(OutputError, match="No space left"):
        commit_output(staging, final)
    monkeypatch.undo()
    assert _snapshot(final) == before
    abort_output(staging)
    abort_output(staging)  # already gone: fine
    assert _hidden_siblings(final) == []


def test_stale_folders_of_dead_runs_are_removed(tmp_path):
    final = tmp_path / "out"
    dead = _dead_pid()
    stale = [tmp_path / f".out.tmp-{dead}-0badc0de", tmp_path / f".out.old-{dead}-0badc0de"]
    live = tmp_path / f".out.tmp-{os.getpid()}-12345678"      # our own, maybe in use
    other_name = tmp_path / f".other.tmp-{dead}-0badc0de"     # another output folder's business
    for d in [*stale, live, other_name]:
        d.mkdir()
        (d / "x").write_text("x")
    with staged_output(final) as staging:
        (staging / "y").write_text("y")
    assert not any(d.exists() for d in stale)
    assert live.exists() and other_name.exists()


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile"):
        prepare_output(tmp_path / "afile" / "out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_unwritable_parent_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OutputError, match="ro"):
            prepare_output(parent / "out")
    finally:
        parent.chmod(stat.S_IRWXU)


def test_staging_folder_refused_by_the_os_is_an_output_error(tmp_path, monkeypatch):
    # What an unwritable parent looks like even to root (read-only mount, ACLs, quota).
    real_mkdir = type(tmp_path).mkdir

    def mkdir(self, *args, **kwargs):
        if ".tmp-" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", mkdir)
    with pytest.raises(OutputError, match=f"cannot write results into {tmp_path}: Permission denied"):
        prepare_output(tmp_path / "out")
    monkeypatch.setattr(resultdir.os, "access", lambda *a: False)
    with pytest.raises(OutputError, match="permission denied"):
        prepare_output(tmp_path / "out")


def test_atomic_write_text(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second µm²")
    assert path.read_text(encoding="utf-8") == "second µm²"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(OutputError, match="cannot write"):
        atomic_write_text(tmp_path / "missing" / "x.json", "x")


def test_a_note_added_to_an_earlier_result_is_not_deleted(tmp_path):
    final = tmp_path / "result"
    with staged_output(final) as staging:
        (staging / "cells.csv").write_text("cell_id\n")
    (final / "my_notes.txt").write_text("reviewed by A.B.\n")
    with pytest.raises(OutputError, match="my_notes.txt"):
        with staged_output(final) as staging:
            (staging / "cells.csv").write_text("cell_id\n1\n")
    assert (final / "my_notes.txt").read_text() == "reviewed by A.B.\n"
    assert (final / "cells.csv").read_text() == "cell_id\n"
    (final / "my_notes.txt").unlink()
    with staged_output(final) as staging:                # only cellseg's files: replaced as before
        (staging / "cells.csv").write_text("cell_id\n1\n")
    assert (final / "cells.csv").read_text() == "cell_id\n1\n"

"""Errors a user can cause. The CLI turns each into one line and a non-zero exit.

Every message says what was expected and what was found.
"""

from __future__ import annotations

from pathlib import Path


class CellsegError(Exception):
    """Base of all errors cellseg raises for bad input or an impossible request."""

    exit_code = 1


class SlideError(CellsegError):
    """The input image is missing, unreadable, corrupt or of an unsupported shape."""


class UnreadableRegionError(SlideError):
    """Part of a slide's pixel data is damaged (a corrupt tile): the count stops, its finished bands are kept for
    --resume, and --skip-unreadable counts the rest."""


class StackError(SlideError):
    """A Z-stack or a time series where one 2-D image is read: the user says which."""


class ZStackError(StackError):
    """A Z-stack opened without saying which plane or projection to read (open_slide's z, --z)."""


class TimeSeriesError(StackError):
    """A time series opened without saying which time point to read (open_slide's t, --t)."""


class ProtocolError(CellsegError):
    """A protocol file is unknown or invalid."""


class BundleError(CellsegError):
    """A model bundle is missing or invalid."""


class OutputError(CellsegError):
    """The output folder cannot be written safely."""


class WriteError(OutputError):
    """A result file could not be written (no space left, no permission, a quota): one line naming the file, the
    folder and the space left there. A journaled count keeps its finished bands for --resume."""

    def __init__(self, what: str, folder: Path, reason: str, space: str):
        self.what, self.folder, self.reason, self.space = what, Path(folder), reason, space
        super().__init__(f"cannot write {what} into {self.folder}: {reason} ({space})")

    def __reduce__(self):     # a Dask worker's error, pickled to the client
        return type(self), (self.what, self.folder, self.reason, self.space)

    def seen_from(self, staging: Path, final: Path) -> WriteError:
        """This failure named in the result folder `final` where it was met in `final`'s staging folder, which is
        gone (or left for --resume) by the time the line is read: the user knows the folder they asked for."""
        try:
            inside = self.folder.relative_to(staging)
        except ValueError:       # not a result file: a journal's own file, say, in the folder kept
            return self
        return WriteError(self.what, Path(final) / inside, self.reason, self.space)


class ParameterError(CellsegError):
    """An impossible parameter value (a usage error)."""

    exit_code = 2


class EvaluationError(CellsegError):
    """Predictions or ground truth are missing, unreadable or do not fit together."""


class TrainingInterrupted(CellsegError):
    """Ctrl-C during `cellseg train`: what was learnt is saved, and --resume continues."""

    exit_code = 130


class JournalError(CellsegError):
    """An unfinished count (or a finished result) that --resume cannot continue from here: it belongs to another
    slide, protocol, model or cellseg version, or the run was not asked to resume."""

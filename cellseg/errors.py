"""Errors a user can cause. The CLI turns each into one line and a non-zero exit.

Every message says what was expected and what was found.
"""


class CellsegError(Exception):
    """Base of all errors cellseg raises for bad input or an impossible request."""

    exit_code = 1


class SlideError(CellsegError):
    """The input image is missing, unreadable, corrupt or of an unsupported shape."""


class UnreadableRegionError(SlideError):
    """Part of a slide's pixel data is damaged (a corrupt tile): the count stops, its finished bands are kept for
    --resume, and --skip-unreadable counts the rest."""


class ProtocolError(CellsegError):
    """A protocol file is unknown or invalid."""


class BundleError(CellsegError):
    """A model bundle is missing or invalid."""


class OutputError(CellsegError):
    """The output folder cannot be written safely."""


class WriteError(OutputError):
    """A result file could not be written (no space left, no permission, a quota): one line naming the file, the
    folder and the space left there. A journaled count keeps its finished bands for --resume."""


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

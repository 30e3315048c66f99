"""Many slides in one job, as `cellseg count SLIDES...` runs them: each slide's count journaled (run/journal.py) so that
a killed job can be resumed, complete results skipped on resume, a bad slide reported without stopping the others,
one progress count of tiles for the whole job.

`count_serially` counts the slides one after another in this process; distributed.count_on_dask runs the same jobs
as Dask tasks. Both give a SlideOutcome per slide, in input order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import CellsegError
from ..slides import open_slide
from .journal import Journal, complete_result, fingerprint, fresh_result_folder

log = logging.getLogger(__name__)


@dataclass
class SlideOutcome:
    """How one slide of a job ended: a summary (counted, or skipped: its complete result was found on resume), or
    the error that failed it. kept_bands: bands read back from the journal of an interrupted run."""

    slide: Path
    out: Path
    series: int | None = None     # the image of a multi-image file this job counted (--series all), None: the counter's
    t: int | None = None          # the time point of a time series this job counted (--t all), None: the counter's
    summary: dict | None = None
    error: CellsegError | None = None
    skipped: bool = False
    kept_bands: int = 0


class JobProgress(Protocol):
    """Progress of a whole job in analysed tiles: `planned` adds a slide's tiles to the total once it is planned
    (or takes them off again when the slide fails), `analysed` reports tiles done."""

    def planned(self, tiles: int) -> None: ...

    def analysed(self, tiles: int) -> None: ...


def begin(slide: Path, out: Path, settings: dict, *, mpp: float | None, resume: bool,
          band_rows: int | None, z: int | str | None = None, series: int | None = None,
          t: int | None = None) -> tuple[Journal | None, dict | None]:
    """(the journal to count `slide` into `out` with, None), or (None, its summary) when resume finds the complete
    result of this very count there. settings: CellCounter.settings(); mpp, z, series, t: as the count opens the
    slide; errors are one-line CellsegErrors."""
    with open_slide(slide, mpp=mpp, z=z, series=series, t=t) as opened:
        print_ = fingerprint(opened.info, settings)
    if resume:
        summary = complete_result(out, print_)
        if summary is not None:
            return None, summary
    return Journal.open(out, print_, resume=resume, band_rows=band_rows), None


def job_outcome(job: tuple) -> SlideOutcome:
    """The outcome to fill of a job: (slide, result folder), or (slide, result folder, series, t) for one image of a
    multi-image file (`--series all`) and one time point of a time series (`--t all`), each counted instead of the
    counter's own --series and --t unless None."""
    slide, out, *image = job
    series, t = (*image, None, None)[:2]
    return SlideOutcome(slide, out, series, t)


def image_settings(settings: dict, series: int | None, t: int | None = None) -> dict:
    """A counter's settings (CellCounter.settings) for one job's image of a multi-image file and time point, as the
    counter's own --series and --t would give them (counter.counting_settings); `settings` itself for None."""
    chosen = {k: v for k, v in (("series", series), ("t", t)) if v is not None}
    return {**settings, "options": {**settings["options"], **chosen}} if chosen else settings


def count_serially(counter, jobs: list[tuple], *, resume: bool = False, band_rows: int | None = None,
                   progress: JobProgress | None = None) -> Iterator[SlideOutcome]:
    """Count each (slide, result folder) of `jobs` with `counter` (counter.CellCounter), one after another; a job
    (slide, result folder, series, t) counts that image and time point of the file (job_outcome)."""
    settings = counter.settings()
    for job in jobs:
        outcome = job_outcome(job)
        slide, out, series, t = outcome.slide, outcome.out, outcome.series, outcome.t
        tiles = _SlideTiles(progress)
        journal = None
        try:
            journal, outcome.summary = begin(slide, out, image_settings(settings, series, t), mpp=counter.mpp,
                                             z=counter.z, series=counter.series if series is None else series,
                                             t=counter.t if t is None else t, resume=resume, band_rows=band_rows)
            outcome.skipped = journal is None
            if journal is not None:
                with journal:
                    outcome.kept_bands = journal.kept_bands
                    outcome.summary = counter.count_into(slide, fresh_result_folder(journal.folder), tiles,
                                                         journal=journal.folder, band_rows=journal.band_rows,
                                                         fingerprint=journal.fingerprint, series=series, t=t)
                    journal.commit()
        except CellsegError as e:
            outcome.error = journal.told(e) if journal is not None else e
            tiles.abandon()
        yield outcome


class _SlideTiles:
    """One slide's pipeline progress(done, total) fed into the job's progress."""

    def __init__(self, job: JobProgress | None):
        self.job, self.done, self.total = job, 0, None

    def __call__(self, done: int, total: int) -> None:
        if self.job is None:
            return
        if self.total is None:
            self.total = total
            self.job.planned(total)
        self.job.analysed(done - self.done)
        self.done = done

    def abandon(self) -> None:
        """The slide failed: its tiles still to do leave the job's total."""
        if self.job is not None and self.total is not None:
            self.job.planned(self.done - self.total)

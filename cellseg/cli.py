"""The `cellseg` command. One group, one function per command; heavy imports inside commands so
`--help` is instant. Options are checked by their click types; the options overriding protocol settings are made
from the settings' declarations (protocol.SETTINGS: flag, type, range, help). A user mistake becomes one line on
stderr and exit 1 (2 for usage errors). Counting goes through counter.CellCounter."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import sys
from pathlib import Path

import click

from . import __version__
from .errors import CellsegError, ParameterError, TimeSeriesError, ZStackError
from .planning import SETTINGS, OneOf, Range, Setting

log = logging.getLogger(__name__)


class _Group(click.Group):
    """Turns CellsegError into `cellseg: error: ...` and its exit code, without a traceback."""

    invoked_args: list[str] | None = None  # the arguments of this run, for run.json

    def main(self, args=None, *rest, **kwargs):
        # sys.argv is not this run's command line when called in-process (CliRunner, scripts).
        self.invoked_args = [str(a) for a in (sys.argv[1:] if args is None else args)]
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CellsegError as e:
            click.echo(f"cellseg: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:   # a command's bad option or argument (click's types): one line too
            click.echo(f"cellseg: error: {e.format_message()}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cellseg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Count and measure cells in microscopy and pathology images of any size."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def result_stem(path: Path) -> str:
    """slide.ome.tif -> slide; image.png -> image; plate.ome.zarr -> plate; a DICOM folder -> its name."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def plan_outputs(images: list[tuple[Path, int | None, int | None]], output: Path | None) -> list[Path]:
    """The result folder of each (input, series, time point) to count: beside it as STEM.cellseg/, -o DIR for one,
    DIR/STEM/ for many; an image N of a multi-image file (`--series all`, else None) adds _sN to STEM, a time point M
    (`--t all`) _tM."""
    stems = [result_stem(p) + (f"_s{k}" if k is not None else "") + (f"_t{n}" if n is not None else "")
             for p, k, n in images]
    if len(images) == 1:
        return [output if output is not None else images[0][0].parent / f"{stems[0]}.cellseg"]
    if output is None:
        outs = [image[0].parent / f"{stem}.cellseg" for image, stem in zip(images, stems)]
    else:
        outs = [output / stem for stem in stems]
    seen: dict[Path, Path] = {}
    for (p, *_), o in zip(images, outs):
        if o in seen:
            raise ParameterError(f"expected inputs with distinct names, got {seen[o]} and {p} which would both "
                                 f"write {o}")
        seen[o] = p
    return outs


def images_to_count(inputs: tuple[Path, ...], series: int | str | None, t: int | str | None, mpp: float | None,
                    z: int | str | None) -> list[tuple[Path, int | None, int | None]]:
    """(input, series, time point) of each count: with `--series all` one for each position of a multi-image file
    (slides.SlideInfo.positions), with `--t all` one for each time point of a time series; else (or for a file of one
    image, one without time points, or one that cannot be opened, whose count will say why) None: the counter's
    --series and --t. Inputs that are files of one multi-file OME-TIFF or Micro-Manager acquisition (a file per
    position, and another every 4 GB) count each image once, from the first input naming it."""
    if series != "all" and t != "all" and sum(_may_be_ome_tiff(p) for p in inputs) < 2:
        return [(p, None, None) for p in inputs]
    from .slides import open_slide
    images, counted = [], {}
    for path in inputs:
        try:
            with open_slide(path, mpp=mpp, z=z, series=None if series == "all" else series,
                            t=1 if t == "all" else t) as slide:
                positions = slide.info.positions if series == "all" else ()
                points = range(1, slide.info.t_points + 1) if t == "all" and slide.info.t_points > 1 else ()
                file_set, image = slide.info.file_set, slide.info.series or 0
        except CellsegError:
            positions, points, file_set, image = (), (), (), 0
        again = []
        for k in positions or [None]:
            for n in points or [None]:
                key = (file_set, image if k is None else k, n)
                if file_set and key in counted:
                    again.append(counted[key])
                    continue
                counted[key] = path
                images.append((path, k, n))
        if again:     # one line an input, not one an image
            log.warning("%s: not counted again: %s of its multi-file acquisition %s counted from %s", path.name,
                        "the image" if len(again) == 1 else f"{len(again)} images", "is" if len(again) == 1 else "are",
                        ", ".join(sorted({other.name for other in again})))
    return images


def _may_be_ome_tiff(path: Path) -> bool:
    """Named as an OME-TIFF is (a batch of them is opened first: its files may be one multi-file set)."""
    return path.name.lower().endswith((".ome.tif", ".ome.tiff", ".ome.tf2", ".ome.tf8", ".ome.btf"))


class _Diameter(click.ParamType):
    """--diameter PX|auto|native: the nuclei's typical diameter in px (> 0), "auto" to measure it, or "native" for
    no resampling."""

    name = "PX|auto|native"

    def convert(self, value, param, ctx):
        if value in ("auto", "native") or isinstance(value, float):
            return value
        try:
            diameter = float(value)
        except ValueError:
            self.fail(f"expected a number of px or 'auto' (or 'native'), got {value!r}", param, ctx)
        if not (math.isfinite(diameter) and diameter > 0):
            self.fail(f"expected a diameter > 0 px, got {value}", param, ctx)
        return diameter


class _NumberOrAll(click.ParamType):
    """--series N|all, --t N|all: one image or time point of a file (slides.series_choice, slides.t_choice, by the
    name `choice`), or "all" of them."""

    name = "N|all"

    def __init__(self, choice: str):
        self.choice = choice

    def convert(self, value, param, ctx):
        from . import slides
        if value == "all":
            return value
        try:
            return getattr(slides, self.choice)(value)
        except ParameterError as e:
            self.fail(f"{e} or all", param, ctx)


class _Z(click.ParamType):
    """--z max|mean|N: what of a Z-stack is counted (slides.z_choice)."""

    name = "max|mean|N"

    def convert(self, value, param, ctx):
        from .slides import z_choice
        try:
            return z_choice(value)
        except ParameterError as e:
            self.fail(str(e), param, ctx)


def protocol_overrides(*keys: str):
    """Decorator: an option for each protocol setting in `keys` (every setting with a flag when none are named),
    made from its declaration in protocol.SETTINGS. The command receives the values given as one mapping,
    `overrides` {protocol key: value}, for Protocol.replace."""
    settings = [s for s in SETTINGS.values() if s.flag and (not keys or s.key in keys)]

    def decorate(command):
        @functools.wraps(command)
        def with_overrides(*args, **kwargs):
            given = {s.key: kwargs.pop(s.key) for s in settings}
            return command(*args, overrides={k: v for k, v in given.items() if v is not None}, **kwargs)
        for setting in reversed(settings):   # as if stacked in SETTINGS' order
            with_overrides = click.option(setting.flag, setting.key, type=_option_type(setting), default=None,
                                          help=f"{setting.help} Default: the protocol's {setting.key}.")(with_overrides)
        return with_overrides
    return decorate


def _option_type(setting: Setting) -> click.ParamType:
    """The click type of the option overriding `setting`: the values the protocol schema allows, so a bad one is a
    usage error naming the option before anything is loaded."""
    if isinstance(setting.allowed, OneOf):
        return click.Choice(setting.allowed.choices)
    if setting.kind in (int, float):
        lo, hi = (setting.allowed.lo, setting.allowed.hi) if isinstance(setting.allowed, Range) else (None, None)
        return click.IntRange(lo, hi) if setting.kind is int else _FiniteFloatRange(lo, hi)
    if setting.kind is str:
        return click.STRING
    raise TypeError(f"expected an int, float or str setting for an option, got {setting.key} ({setting.kind})")


class _FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN (which passes every bound's comparison) and infinity."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"expected a finite number, got {value}", param, ctx)
        return number


_POSITIVE = _FiniteFloatRange(0, min_open=True)
# Options count and info share.
_PROTOCOL_OPTION = click.option("-p", "--protocol", "protocol_name", default="fluorescence-nuclei",
                                show_default=True, help="Protocol name (see `cellseg protocols list`) or a .toml file.")
_MPP_OPTION = click.option("--mpp", type=_POSITIVE, default=None,
                           help="Pixel size in µm/px, overriding the file's.")
_Z_OPTION = click.option("--z", "z", type=_Z(), default=None,
                         help="A Z-stack's plane to count, from 1 as Fiji counts (napari's slider counts from 0), or "
                              "max or mean for a projection of all its planes. Without it a Z-stack is refused.")
_SERIES_HELP = ("Which image of a file holding several to count (an OME-TIFF's positions, a bioformats2raw folder's "
                "series), from 0 as its OME-XML and bfconvert number them. Default: the first, with a warning naming "
                "the others.")
_SERIES_OPTION = click.option("--series", type=click.IntRange(0), default=None, metavar="N", help=_SERIES_HELP)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Result folder (one input) or parent folder of one result folder per input.")
@_PROTOCOL_OPTION
@protocol_overrides()
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@_MPP_OPTION
@_Z_OPTION
@click.option("--series", type=_NumberOrAll("series_choice"), default=None,
              help=_SERIES_HELP + " 'all': each of its positions, a result folder STEM_sN each (and summary.csv).")
@click.option("--t", "t", type=_NumberOrAll("t_choice"), default=None,
              help="A time series' time point to count, from 1 as Fiji counts (napari's slider counts from 0), or "
                   "'all': each of them, a result folder STEM_tN each (and summary.csv). Without it a time series is "
                   "refused.")
@click.option("--diameter", type=_Diameter(), default=None,
              help="Typical nucleus diameter in this image (px), or 'auto' to measure it: tiles are resampled so "
                   "nuclei reach the model at its training size; 'native': not resampled. Default: the pixel size "
                   "sets the scale where the model has one in µm for the protocol's modality (checked against the "
                   "measured nuclei), else as 'auto' (docs/pipeline.md, Scale).")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: every tile also flipped and rotated (8 views), cells merged by vote. "
                   "About 8x the detection time (docs/performance.md).")
@click.option("--workers", type=click.IntRange(1), default=None, metavar="N",
              help="Count on a local Dask cluster of N worker processes: slides, and bands of tile rows of big "
                   "slides, are shared out among them.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Count on an existing Dask cluster, e.g. tcp://node1:8786 (dask scheduler + dask worker, "
                   "dask-jobqueue, Kubernetes); slides and results must be on storage every worker sees.")
@click.option("--band-rows", type=click.IntRange(1), default=None, metavar="N",
              help="Tile rows per band, the unit shared out among workers and kept for --resume "
                   "(default: the fewest rows holding 64 tiles; a resumed count keeps its own).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted count: its finished bands are read back, not computed again, and "
                   "slides whose results are complete are skipped. Of the settings only the export ones (--outputs) "
                   "may differ from the count resumed (e.g. fewer files after a full disk).")
@click.option("--estimate", is_flag=True,
              help="Only say how long the count would take on this machine, from a few timed tiles of each "
                   "slide; nothing is written.")
@click.option("--regions", "regions_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="FILE",
              help="Count only inside these regions: a GeoJSON of polygons (QuPath's exported annotations, or any "
                   "GIS tool's). Adds cells.csv's region column and regions.csv.")
@click.option("--regions-units", type=click.Choice(["px", "um"]), default="px", show_default=True,
              help="Units of the regions' coordinates: level-0 px, or µm (needs the pixel size).")
@click.option("--skip-unreadable", is_flag=True,
              help="Count around damaged pixel data (a corrupt tile) instead of stopping: the unreadable regions "
                   "are left out of the count, the tissue area and the density, and listed in summary.json and "
                   "report.html (docs/report.md). Not with --workers/--scheduler.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def count(inputs, output, protocol_name, overrides, device, mpp, z, series, t, diameter, tta, workers, scheduler,
          band_rows, resume, estimate, regions_file, regions_units, skip_unreadable, quiet) -> None:
    """Count and measure cells in one or more slides: TIFF family, DICOM (file or folder), MRXS, VMS, BIF, CZI,
    OME-Zarr, PNG, JPEG."""
    from .planning import check_pixel_size, load_protocol
    from .results import atomic_write_text

    if workers is not None and scheduler is not None:
        raise click.UsageError(f"expected --workers N or --scheduler ADDRESS, got both (--workers {workers} "
                               f"--scheduler {scheduler})")
    if skip_unreadable and (workers is not None or scheduler is not None):
        # The regions a worker meets stay in that worker: the summary could not list them all.
        raise click.UsageError("expected --skip-unreadable in a count in this process, got it with "
                               f"{'--workers' if workers is not None else '--scheduler'}")

    # The rules across two options (tile and halo, cell expansion in µm or px) are the protocol's.
    protocol = load_protocol(protocol_name).replace(**overrides)
    regions = None
    if regions_file is not None:
        from .planning import load_regions
        regions = load_regions(regions_file, regions_units)
    images = images_to_count(inputs, series, t, mpp, z)
    # the counter's; each position or time point of `all` is its job's
    series, t = (None if series == "all" else series), (None if t == "all" else t)
    outputs = plan_outputs(images, output)
    summary_csv = output / "summary.csv" if output is not None and len(images) > 1 else None
    if summary_csv is not None:
        _check_cohort_folder(output, len(images))
    if len(images) == 1:   # cheap (lazy): a wrong path or a missing pixel size fails before torch and the model load
        # (a missing pixel size: the protocol's require_mpp, or a cell expansion in µm)
        from .slides import open_slide
        one, one_series, one_t = images[0]
        with open_slide(one, mpp=mpp, z=z, series=series if one_series is None else one_series,
                        t=t if one_t is None else one_t) as slide:
            check_pixel_size(protocol, slide.info)
            if regions is not None:     # regions in µm without a pixel size, or none on the slide
                regions.in_pixels(slide.info.mpp, slide.info.height, slide.info.width, note=False)
    import shlex

    from .planning import DEFAULT_SCALE
    from .results import RESULT_MARKER, RunInfo
    from .results.appearance import appearance_warning
    from .run import CounterSpec, count_serially
    argv = main.invoked_args if main.invoked_args is not None else sys.argv[1:]
    spec = CounterSpec(protocol, device, diameter_px=DEFAULT_SCALE if diameter is None else diameter, mpp=mpp, tta=tta,
                       run_info=RunInfo(command=shlex.join(["cellseg", *argv])), regions=regions,
                       skip_unreadable=skip_unreadable, z=z, series=series, t=t)
    if estimate:
        counter = spec.load()
        for (path, image, point), out in zip(images, outputs):
            click.echo(counter.estimate(path, series=image, t=point).describe() + _free_space(out))
        return
    jobs = [(path, out, image, point) for (path, image, point), out in zip(images, outputs)]
    # an earlier count's result in the way is replaced (results.folder): the count's line says so
    earlier = {out for out in outputs if (out / RESULT_MARKER).is_file()}
    rows, failures = [], 0
    with _terminate_as_interrupt(), \
            _JobBar(inputs[0].name if len(images) == 1 else f"{len(images)} slides", enabled=not quiet) as bar:
        if workers is None and scheduler is None:
            outcomes = count_serially(spec.load(), jobs, resume=resume, band_rows=band_rows, progress=bar)
        else:
            from .run import count_on_dask
            # distributed sets its loggers to INFO when imported: its warnings (a worker restarted) show with -v.
            logging.getLogger("distributed").setLevel(logging.getLogger().getEffectiveLevel() + 10)
            outcomes = count_on_dask(spec, jobs, workers=workers, scheduler=scheduler, resume=resume,
                                     band_rows=band_rows, progress=bar)
        for outcome in outcomes:
            out, summary = outcome.out, outcome.summary
            path = str(outcome.slide) + (f" (--series {outcome.series})" if outcome.series is not None else "") \
                + (f" (--t {outcome.t})" if outcome.t is not None else "")
            if outcome.error is not None:
                if len(images) == 1:
                    raise outcome.error
                failures += 1
                bar.echo(f"cellseg: error: {path}: {outcome.error}", err=True)
                rows.append({"input": str(outcome.slide), "series": outcome.series, "t": outcome.t, "status": "error",
                             "error": str(outcome.error)})
                continue
            if outcome.skipped:
                bar.echo(f"{path}: complete result in {out}, skipped (--resume): {summary['cell_count']} cells")
            else:
                kept = (f" ({outcome.kept_bands} band(s) read back from the interrupted run)"
                        if outcome.kept_bands else "")
                replaced = " (it held an earlier result: replaced)" if out in earlier else ""
                bar.echo(f"{path}: {summary['cell_count']} cells -> {out}{kept}{replaced}")
                estimate = summary.get("count_estimate") or {}
                if estimate.get("estimated_true_count") is not None:     # results/uncertainty.py
                    # --outputs may have left the report out
                    how = "report.html" if (out / "report.html").is_file() else "docs/uncertainty.md"
                    bar.echo(f"  estimated true count {round(estimate['estimated_true_count']):,} "
                             f"({round(100 * estimate['interval_level'])} % interval "
                             f"{round(estimate['interval_low']):,}-{round(estimate['interval_high']):,}): an estimate "
                             f"from validation data ({how} says how)")
                # a pixel size the nuclei contradict makes every µm figure wrong: said here, not only in the report
                scale_warning = (summary.get("scale") or {}).get("warning")
                if scale_warning:
                    bar.echo(f"cellseg: warning: {path}: {scale_warning}", err=True)
                unlike = appearance_warning(summary.get("appearance"))     # results/appearance.py
                if unlike:
                    bar.echo(f"cellseg: warning: {path}: {unlike}", err=True)
            if summary.get("unreadable"):
                bar.echo(f"cellseg: warning: {path}: {len(summary['unreadable'])} unreadable region(s), "
                         f"{summary['unreadable_area_px']:,} px, left out of the count, the tissue area and the "
                         f"density (listed in {out / 'summary.json'})", err=True)
            rows.append({"input": str(outcome.slide), "status": "ok", "result": str(out),
                         "cell_count": summary["cell_count"],
                         "mpp": summary["mpp"], "z": summary.get("z"),     # a Z-stack's plane or projection
                         "series": summary.get("series"),                  # a multi-image file's image counted
                         "t": summary.get("t"),                            # a time series' point counted
                         "tissue_area_mm2": summary["tissue_area_mm2"],
                         # --regions: cells_per_mm2 is per mm² of the tissue inside them
                         "tissue_area_in_regions_mm2": summary.get("tissue_area_in_regions_mm2"),
                         "cells_per_mm2": summary["cells_per_mm2"],
                         **{k: (summary.get("count_estimate") or {}).get(k) for k in _ESTIMATE_COLUMNS},
                         "median_area_px": (summary["area_px"] or {}).get("median"),
                         "tiles_total": summary["tiles_total"], "tiles_skipped": summary["tiles_skipped"],
                         "seconds": summary["seconds"]["total"],
                         "warnings": "; ".join(summary.get("warnings") or [])})   # the report's, for a filter
    if summary_csv is not None:
        output.mkdir(parents=True, exist_ok=True)      # every input failed: no result made it, the summary says why
        atomic_write_text(summary_csv, _summary_csv_text(rows))
        click.echo(f"summary of {len(rows)} inputs -> {summary_csv}")
        from .results import CohortRow, write_cohort_report
        cohort = [CohortRow(Path(r["input"]).name + (f" #{r['series']}" if r.get("series") is not None else "")
                            + (f" t{r['t']}" if r.get("t") is not None else ""),
                            Path(r["result"]) if r.get("result") else None,
                            _read_summary(Path(r["result"])) if r.get("result") else None, r.get("error"))
                  for r in rows]
        click.echo(f"report of {len(rows)} inputs -> {write_cohort_report(output, cohort)}")
    if failures:
        raise CellsegError(f"{failures} of {len(images)} inputs failed (see the errors above)")


def _read_summary(folder: Path) -> dict | None:
    import json
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
def report(results) -> None:
    """Rebuild report.html in existing result folders; for several (or a folder of them) also the cohort report
    there (or in their common parent). The crops are read from the slide named in run.json."""
    from .results import CohortRow, check_cohort_report_target, result_folders, write_cohort_report, write_report
    folders, cohort = result_folders(list(results))
    if cohort is not None:      # before any slide's report is rebuilt
        check_cohort_report_target(cohort, "move it, or rebuild the slides' reports one at a time")
    rows, failures = [], 0
    for folder in folders:
        try:
            warnings = write_report(folder)
        except CellsegError as e:
            if len(folders) == 1:
                raise
            failures += 1      # one folder's page not drawn: the others are, and the cohort lists it with why
            click.echo(f"cellseg: error: {folder}: {e}", err=True)
            rows.append(CohortRow(folder.name, folder, _read_summary(folder), str(e)))
            continue
        click.echo(f"{folder / 'report.html'}" + (f" ({len(warnings)} warning(s))" if warnings else ""))
        rows.append(CohortRow(folder.name, folder, _read_summary(folder)))
    if cohort is not None:
        rows += _inputs_that_failed(cohort, folders)
        click.echo(f"report of {len(rows)} results -> {write_cohort_report(cohort, rows)}")
    if failures:
        raise CellsegError(f"{failures} of {len(folders)} reports could not be drawn (see the errors above)")


def _inputs_that_failed(cohort: Path, folders: list[Path]):
    """The inputs a count of several slides into `cohort` listed as failed in its summary.csv (its own, by the
    header) and that have no result folder there since: a rebuilt cohort report keeps them with their error, as the
    count's did."""
    import csv

    from .results import CohortRow
    summary_csv = cohort / "summary.csv"
    try:
        with open(summary_csv, newline="", encoding="utf-8") as f:
            if not f.readline().startswith(_SUMMARY_HEADER_START):
                return []
            f.seek(0)
            listed = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []       # no summary (a folder of results gathered by hand): nothing more to list
    found = {f.resolve() for f in folders}
    return [CohortRow(Path(row["input"]).name, None, None, row.get("error") or "failed (summary.csv)")
            for row in listed if row.get("status") == "error" and row.get("input")
            and (cohort / result_stem(Path(row["input"]))).resolve() not in found]


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a batch scheduler's time limit, `kill`) ends a count as Ctrl-C does: its workers stopped, the finished
    bands kept for --resume with a line that says so, exit 1; by default the process died where it stood, silently."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():     # signal handlers live in the main thread
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _JobBar:
    """One tqdm bar of the whole job's analysed tiles (cohort.JobProgress): its total grows as slides are
    planned. Lines printed through `echo` do not break it."""

    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled, self.bar = name, enabled, None
        self._logging = None

    def planned(self, tiles: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            from .util import progress_interval
            # created with the first slide's tiles: a bar made with total 0 draws a meaningless "0tile" first
            self.bar = tqdm(total=tiles, desc=self.name, unit="tile", disable=not self.enabled,
                            mininterval=progress_interval())
            return
        self.bar.total += tiles
        self.bar.refresh()

    def analysed(self, tiles: int) -> None:
        if self.bar is not None and tiles:
            self.bar.update(tiles)

    def echo(self, line: str, err: bool = False) -> None:
        """A line on stdout (err: stderr) that clears the bar's line first and redraws it after: printed beside it,
        a warning would follow the bar's last redraw on its line."""
        if self.bar is not None and self.enabled:
            self.bar.write(line, file=sys.stderr if err else sys.stdout)
        else:
            click.echo(line, err=err)

    def __enter__(self) -> _JobBar:
        if self.enabled:
            # the library's warnings (a band kept for --resume, a slide unlike the training images) go through the
            # bar too: written straight to stderr they were glued to its last redraw, and a terminal overwrote them
            from tqdm.contrib.logging import logging_redirect_tqdm
            self._logging = logging_redirect_tqdm()
            self._logging.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._logging is not None:
            self._logging.__exit__(*exc)


_ESTIMATE_COLUMNS = ["estimated_true_count", "interval_low", "interval_high"]    # summary.json's count_estimate
_SUMMARY_COLUMNS = ["input", "status", "result", "cell_count", "mpp", "z", "series", "t", "tissue_area_mm2",
                    "tissue_area_in_regions_mm2", "cells_per_mm2", *_ESTIMATE_COLUMNS, "median_area_px",
                    "tiles_total", "tiles_skipped", "seconds", "warnings", "error"]
_SUMMARY_HEADER_START = ",".join(_SUMMARY_COLUMNS[:3])    # how a summary.csv cellseg wrote is told from the user's


def _summary_csv_text(rows: list[dict]) -> str:
    import csv
    import io
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _free_space(out: Path) -> str:
    """"; N GB free in FOLDER": the space left where the result folder `out` would go (--estimate)."""
    import shutil

    from .results import describe_size
    where = Path(out).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return f"; {describe_size(shutil.disk_usage(where).free)} free in {where}"
    except OSError:
        return ""


def _check_cohort_folder(folder: Path, slides: int) -> None:
    """Before a count of several slides into -o `folder`: it can hold their result folders, summary.csv and the
    cohort's report.html, and nothing of the user's is replaced (a summary.csv or report.html cellseg did not
    write, one slide's result folder)."""
    from .errors import OutputError
    from .results import RESULT_MARKER, check_cohort_report_target
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"expected a folder at {folder} to hold the results of {slides} slides, found a file")
    if (folder / RESULT_MARKER).exists():
        raise OutputError(f"expected a folder to hold the results of {slides} slides, found one slide's result in "
                          f"{folder}; choose another output folder with -o")
    summary_csv = folder / "summary.csv"       # cellseg's own by its header
    if summary_csv.is_dir() or (summary_csv.exists() and not summary_csv.read_text(errors="replace").startswith(
            _SUMMARY_HEADER_START)):
        raise OutputError(f"expected {summary_csv} to be absent or a cellseg summary, found another file; choose "
                          f"another output folder with -o")
    check_cohort_report_target(folder, "choose another output folder with -o")


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@_PROTOCOL_OPTION
@protocol_overrides("tile_size", "halo_px")
@_MPP_OPTION
@_Z_OPTION
@_SERIES_OPTION
@click.option("--t", "t", type=click.IntRange(1), default=None, metavar="N",
              help="A time series' time point to describe, from 1 (default: the first, saying what a count needs).")
@click.option("--diameter", type=_POSITIVE, default=None, metavar="PX",
              help="Typical nucleus diameter in px: the tiles as `cellseg count --diameter PX` resamples them "
                   "(count's `auto` measures the nuclei with the network, which info does not load).")
def info(slide, protocol_name, overrides, mpp, z, series, t, diameter) -> None:
    """What cellseg sees in a slide before a long run: format and backend, pyramid levels, channels, pixel
    size and its source, and the protocol's tile count. Fast: reads metadata, loads no model."""
    from .describe import describe_slide, slide_look_of
    from .planning import load_protocol
    from .slides import open_slide
    protocol = load_protocol(protocol_name).replace(**overrides)
    # what info is for: a Z-stack described as its max projection and a time series at its first point, saying what
    # a count needs
    read_z, read_t = z, t
    while True:
        try:
            opened = open_slide(slide, mpp=mpp, z=read_z, series=series, t=read_t)
            break
        except ZStackError:
            if read_z is not None:
                raise
            read_z = "max"
        except TimeSeriesError:
            if read_t is not None:
                raise
            read_t = 1
    opened.info = dataclasses.replace(opened.info, z=z if opened.info.z_planes > 1 else None,
                                      t=t if opened.info.t_points > 1 else None)
    with opened:
        for line in describe_slide(opened.info, protocol, diameter, slide_look_of(opened, protocol)):
            click.echo(line)


@main.group()
def protocols() -> None:
    """Named analysis presets."""


@protocols.command("list")
def protocols_list() -> None:
    """Names and descriptions of the shipped protocols."""
    from .planning import list_protocols, load_protocol
    for name in list_protocols():
        click.echo(f"{name:24s} {load_protocol(name).description}")


@protocols.command("show")
@click.argument("name")
def protocols_show(name: str) -> None:
    """A protocol's settings, as TOML."""
    import tomli_w

    from .planning import load_protocol
    protocol = load_protocol(name)
    click.echo(f"# {protocol.source}")
    click.echo(tomli_w.dumps(protocol.to_dict()), nl=False)


@main.command()
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Annotated images to train on: a COCO instance JSON, or a folder of images with their instance "
                   "label images (NAME.tif + NAME_masks.tif as Cellpose saves them, NAME-labels.png, or images/ "
                   "beside labels/ or masks/) or their QuPath GeoJSON (NAME.geojson: its rectangle annotations are "
                   "the fields annotated in full).")
@click.option("--val", type=click.Path(path_type=Path), default=None,
              help="Held-out annotated images, as --data (default when fine-tuning: part of --data is held out). "
                   "They are counted as `cellseg count` would; the score threshold with the best F1 on them becomes "
                   "the bundle's for the protocol's modality, and the figures go into its model.toml.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Bundle folder to write: new or empty, or the folder of the training to --resume.")
@_PROTOCOL_OPTION
@_MPP_OPTION
@click.option("--init", "init", default="protocol", show_default=True,
              metavar="protocol|none|coco|coco:FILE|BUNDLE",
              help="Starting weights: the protocol's bundle, fine-tuned (its thresholds, scale and normalisation kept; "
                   "checked against it on held-out images); random; torchvision's COCO Mask R-CNN (local file); or "
                   "another bundle to fine-tune.")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Training steps (default: scaled to the annotated nuclei when fine-tuning, 2000 otherwise).")
@click.option("--minutes", type=_POSITIVE, default=None,
              help="Time budget: the learning-rate schedule and the held-out checks fit in it; stops with a "
                   "checkpoint after this long.")
@click.option("--batch-size", type=click.IntRange(1), default=2, show_default=True)
@click.option("--crop", type=click.IntRange(64), default=256, show_default=True, help="Training crop size in px.")
@click.option("--lr", type=_POSITIVE, default=None,
              help="Learning rate (default: 3e-4 from random or COCO weights; 1e-4 when fine-tuning a bundle, "
                   "which a higher rate partly undoes).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--keep-anyway", is_flag=True,
              help="Exit 0 even when the fine-tuned bundle does not beat the one it started from on the held-out "
                   "images (its card says so either way).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train(data, val, out, protocol_name, mpp, init, steps, minutes, batch_size, crop, lr, device, resume,
          keep_anyway, quiet) -> None:
    """Train a cell Mask R-CNN on annotated images (COCO, label images or QuPath GeoJSON) and write a model bundle:
    by default the protocol's bundle fine-tuned on them (docs/finetune.md)."""
    from .detection import resolve_device
    from .planning import load_protocol
    from .training import check_output_folder, load_annotations, starts_from_bundle
    protocol = load_protocol(protocol_name)
    start = protocol.model if init == "protocol" else init
    check_output_folder(out, resume)
    if val is not None:   # a wrong --val fails now, not after hours of training
        from .evaluation import annotated_regions, shared_images
        val_regions = annotated_regions(val)
        shared = shared_images(data, val_regions)
        if shared:
            click.echo(f"cellseg: warning: {len(shared)} of the {len(val_regions)} --val images are also in --data "
                       f"(e.g. {shared[0]}): the validation figures will be optimistic", err=True)
    if starts_from_bundle(start):
        from .bundles import find_bundle
        find_bundle(start)   # an unknown bundle fails before the images are read
    torch_device = str(resolve_device(device))
    items, classes = load_annotations(data)
    if not starts_from_bundle(start):
        _train_from_scratch(items, classes, out, val, start, steps, minutes, batch_size, crop, lr, resume,
                            torch_device, quiet, protocol)
        return
    if protocol.require_mpp and mpp is None:
        # refused as `cellseg count -p PROTOCOL` refuses them: the count the fine-tune ends with must work on them
        from .planning import check_pixel_size
        from .slides import open_slide
        for item in items:
            with open_slide(Path(item.source)) as slide:
                check_pixel_size(protocol, slide.info)
    from .planning import gray_input, images_warning, slide_look
    from .training import finetune
    looks = [slide_look(it.image.transpose(1, 2, 0), colour=not gray_input(it.image)) for it in items]
    mismatch = images_warning(looks, protocol.name, protocol.modality)
    if mismatch:
        click.echo(f"cellseg: warning: {mismatch}", err=True)
    verdict = finetune(items, classes, out, start, protocol, val=val, mpp=mpp, steps=steps, minutes=minutes, lr=lr,
                       batch_size=batch_size, crop=crop, device=torch_device, resume=resume, progress=not quiet)
    from .bundles import load_bundle
    card = load_bundle(out).card["finetune"]
    click.echo(f"held out: {card['heldout']} ({card['heldout_nuclei']} nuclei); trained on {card['training_nuclei']} "
               f"nuclei, {card['steps_run']} steps{' (stopped early)' if verdict.stopped_early else ''}")
    for line in verdict.lines():
        click.echo("  " + line)
    options = card["scale"]["count_options"]
    import shlex
    given = shlex.quote(str(protocol_name))     # as typed: a protocol file is named by its path, not its name
    count_hint = f"cellseg count -p {given} --model {shlex.quote(str(out))}{' ' + options if options else ''}"
    if verdict.better:
        click.echo(f"bundle written to {out}: the fine-tuned step {verdict.chosen_step}, score threshold "
                   f"{verdict.threshold:.2f} for {card['threshold_key']}; count with `{count_hint}`")
        return
    click.echo(f"the fine-tuned bundle does NOT beat {start} on the held-out images (AP50 "
               f"{verdict.table[2]['ap50_tp_fp_fn_pooled']:.3f} against {verdict.table[1]['ap50_tp_fp_fn_pooled']:.3f}"
               f", {verdict.gain:+.3f} where chance alone moves it by {verdict.margin:.3f}): keep counting with "
               f"{start}; {out} keeps it for inspection and its card says so", err=True)
    own, retuned = verdict.table[0], verdict.table[1]
    if (retuned["ap50_tp_fp_fn_pooled"] or 0) > (own["ap50_tp_fp_fn_pooled"] or 0):
        # the start bundle counted as these images need (the protocol, its own bundle unless --init named another,
        # the scale's options), at the retuned threshold
        start_hint = (f"cellseg count -p {given}{'' if init == 'protocol' else f' --model {shlex.quote(str(start))}'}"
                      f"{' ' + options if options else ''} --score-threshold {retuned['score_threshold']:.2f}")
        click.echo(f"{start} itself scored AP50 {retuned['ap50_tp_fp_fn_pooled']:.3f} on them at score threshold "
                   f"{retuned['score_threshold']:.2f} (retuned there), {own['ap50_tp_fp_fn_pooled']:.3f} at its own "
                   f"{own['score_threshold']:.2f}: `{start_hint}` uses it", err=True)
    if not keep_anyway:
        click.get_current_context().exit(1)
    click.echo(f"kept anyway (--keep-anyway): count with `{count_hint}`")


def _train_from_scratch(items, classes, out, val, init, steps, minutes, batch_size, crop, lr, resume, device,
                        quiet, protocol) -> None:
    """`cellseg train --init none | coco`: a network trained from random or COCO weights, then --val (counted as
    `protocol` counts)."""
    from .training import TrainSettings
    from .training import train as run_training
    settings = TrainSettings(steps=steps or 2000, batch_size=batch_size, crop=crop, lr=lr or 3e-4, minutes=minutes)
    bundle = run_training(items, classes, out, settings, resume=resume, device=device, init=init,
                          progress=not quiet, folder_checked=True)
    click.echo(f"bundle written to {bundle}")
    if val is not None:
        from .evaluation import validate_bundle
        validation = validate_bundle(bundle, val, bundle / "validation", device=device, progress=not quiet,
                                     protocol=protocol)
        for line in validation.lines():
            click.echo(line)
        chosen = ("(best F1 on --val) stored in" if validation.tuned else
                  "(not tuned: nothing on --val to choose it by) kept in")
        click.echo(f"default score threshold {validation.threshold:.2f} {chosen} {bundle / 'model.toml'}; "
                   f"validation report -> {bundle / 'validation'}")


@main.command()
@click.argument("pred", type=click.Path(path_type=Path))
@click.option("--gt", type=click.Path(path_type=Path), required=True,
              help="Ground truth: COCO instance JSON, label image (0 = background), cellseg result folder, a folder "
                   "of images with their label images (as `cellseg train --data`), or a GeoJSON file (QuPath's "
                   "export; cells.geojson corrected): scored on its rectangle annotations (each a field checked in "
                   "full; PRED a result folder or GeoJSON). PRED is any of these too, or a folder of result folders.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for metrics.json, per_image.csv and threshold_sweep.png.")
@click.option("--iou", type=_FiniteFloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="IoU for a predicted cell to count as found.")
def evaluate(pred, gt, out, iou) -> None:
    """Score predictions (COCO JSON, label image or result folder) against ground truth."""
    from .evaluation import check_report_folder, summary_lines, write_report
    from .evaluation import evaluate as run_evaluation
    if out is not None:     # before the scoring, which can take long
        check_report_folder(out)
    report = run_evaluation(pred, gt, iou=iou)
    for line in summary_lines(report):
        click.echo(line)
    if out is not None:
        write_report(report, out)
        click.echo(f"metrics -> {out}")


if __name__ == "__main__":
    main()

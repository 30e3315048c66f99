"""The library's entry point: `CellCounter` loads the models once, then counts slide after slide.

    counter = CellCounter.load(load_protocol("fluorescence-nuclei"), device="auto")
    summary = counter.count("slide.ome.tif", "slide.cellseg", progress=lambda done, total: ...)

`cellseg count`, the napari widget and validation (`cellseg train --val`) all count through it, so they run the
same pipeline: the same detector with its slide-level normalisation, the tissue U-Net on the detector's device,
the same result folder committed atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..geometry import TileDetector
from ..planning import DEFAULT_SCALE, Protocol, RegionFile
from ..results import RunInfo, staged_output
from ..slides import series_choice, t_choice, z_choice
from ..tissue import TissueFinder
from .pipeline import Progress, count_slide

if TYPE_CHECKING:
    from ..bundles import MicronScale


class CellCounter:
    """A protocol and its loaded models (detector + tissue finder), ready to count any number of slides.

    model_diameter_px: the training nucleus size the detector expects (its bundle's), micron_scale its bundle's scale
    in µm for the protocol's modality (Bundle.micron_scale); diameter_px: the slides' (--diameter), "auto" to measure
    it on each slide, planning.DEFAULT_SCALE for the scale a count chooses itself (CellCounter.load's and `cellseg
    count`'s default: the pixel size, checked, else measured), "native", or None (no measuring: native, or the
    protocol's nucleus_diameter_um at the pixel size; planning.plan_slide); mpp: a pixel size overriding the slides' own;
    run_info: what run.json records besides the count itself (summary.RunInfo: command line, device, model bundle);
    regions: count only inside these (regions.load_regions; --regions), on every slide; z: what of a Z-stack is
    counted, a plane from 1 or a projection, "max" or "mean" (slides.open_slide; --z), on every slide; series: which
    image of a file holding several is counted, from 0 (slides.open_slide; --series), on every slide; t: which time
    point of a time series, from 1 (--t).
    """

    def __init__(self, protocol: Protocol, detector: TileDetector, *, tissue: TissueFinder | None = None,
                 model_diameter_px: float | None = None, diameter_px: float | str | None = None,
                 mpp: float | None = None, run_info: RunInfo | None = None, regions: RegionFile | None = None,
                 skip_unreadable: bool = False, micron_scale: MicronScale | None = None, z: int | str | None = None,
                 series: int | None = None, t: int | None = None):
        self.protocol, self.detector = protocol, detector
        self.z, self.series, self.t = z_choice(z), series_choice(series), t_choice(t)
        self.micron_scale = micron_scale
        self.regions = regions
        self.skip_unreadable = skip_unreadable     # count around damaged pixel data (pipeline.count_slide)
        self.tissue = tissue or TissueFinder(protocol.tissue_method, device=str(detector.device))
        self.model_diameter_px, self.diameter_px, self.mpp = model_diameter_px, diameter_px, mpp
        self.run_info = run_info or RunInfo()

    @classmethod
    def load(cls, protocol: Protocol, device: str = "auto", *, diameter_px: float | str | None = DEFAULT_SCALE,
             mpp: float | None = None, run_info: RunInfo | None = None, tta: bool = False,
             regions: RegionFile | None = None, skip_unreadable: bool = False,
             z: int | str | None = None, series: int | None = None, t: int | None = None) -> CellCounter:
        """The protocol's model bundle as a Detector on `device` (auto|cpu|cuda), and its tissue finder there too.

        Score threshold: the protocol's when it sets one, else the bundle's, tuned for the protocol's modality
        (fluorescence | brightfield) when the bundle has one for it, and for a slide whose network input has no
        colour its modality's gray one (brightfield_gray) when the bundle has that. tta: test-time augmentation (cellseg.detection.tta: the
        8 flips and rotations of every tile, cells merged; thresholds tuned with TTA when the bundle has them).
        run.json records `run_info` (the caller's command) with the device, the precision and the bundle.
        """
        from ..bundles import load_bundle
        from ..detection import CANDIDATE_FLOOR, AugmentedDetector, Detector, member_threshold, runtime_environment
        from ..results import ResultWriter
        from .measuring import start_spare_measurers
        ResultWriter.start_spare_processes()    # the result files' processes start while the network loads
        start_spare_measurers()                 # and the measuring ones, where there are the cores for them
        bundle = load_bundle(protocol.model)
        model = model_record(bundle, protocol, tta)
        # with TTA these are the merged cells' (the views' detector keeps cells down to tta.member_threshold)
        threshold, gray_threshold = model["score_thresholds"]["colour"], model["score_thresholds"]["gray"]
        detector = Detector.from_bundle(
            bundle, device, mask_threshold=model["mask_threshold"], batch_size=protocol.batch_size,
            precision=protocol.precision,
            score_threshold=member_threshold(min(threshold, gray_threshold)) if tta else threshold,
            gray_score_threshold=None if tta else gray_threshold,
            candidate_floor=None if tta else CANDIDATE_FLOOR)     # TTA's merged scores: no count curve
        precision = detector.precision_note
        if tta:
            detector = AugmentedDetector(detector, threshold, gray_score_threshold=gray_threshold)
        return cls(protocol, detector, model_diameter_px=bundle.nucleus_diameter_px, diameter_px=diameter_px,
                   mpp=mpp, run_info=replace(run_info or RunInfo(), device=str(detector.device), precision=precision,
                                             environment=runtime_environment(str(detector.device)), model=model),
                   regions=regions, skip_unreadable=skip_unreadable,
                   micron_scale=bundle.micron_scale(protocol.modality), z=z, series=series, t=t)

    def settings(self) -> dict:
        """What this counter's cells depend on besides the slide (journal.fingerprint): protocol, model, options."""
        return counting_settings(self.protocol, self.run_info.model, self.mpp, self.diameter_px, self.regions, self.z,
                                 self.series, self.t)

    def count(self, slide: str | os.PathLike, out_dir: str | os.PathLike, progress: Progress | None = None) -> dict:
        """Count one slide into the result folder `out_dir`, committed only when complete (results.staged_output:
        `out_dir` may be new, empty or an earlier result; a failure or a cancel leaves it as it was). Returns the
        summary. progress(tiles analysed, tiles to analyse) may raise to cancel."""
        with staged_output(Path(out_dir)) as staging:
            return self.count_into(slide, staging, progress)

    def estimate(self, slide: str | os.PathLike, sample_tiles: int = 8, series: int | None = None,
                 t: int | None = None):
        """How long `count(slide, ...)` would take here, from `sample_tiles` timed tiles (estimate.Estimate);
        nothing is written. series, t: the file's image and time point to count, else the counter's own."""
        from .estimate import estimate_count
        return estimate_count(Path(slide), self.protocol, self.detector, self.tissue, mpp=self.mpp,
                              model_diameter_px=self.model_diameter_px, diameter_px=self.diameter_px,
                              regions=self.regions, sample_tiles=sample_tiles, micron_scale=self.micron_scale,
                              z=self.z, series=self.series if series is None else series,
                              t=self.t if t is None else t)

    def count_into(self, slide: str | os.PathLike, folder: Path, progress: Progress | None = None, *,
                   journal: Path | None = None, band_rows: int | None = None,
                   fingerprint: dict | None = None, series: int | None = None, t: int | None = None) -> dict:
        """Count one slide, writing its result files into `folder`, a staging folder the caller commits (to add
        files of its own first). Returns the summary. journal, band_rows: pipeline.count_slide's; fingerprint:
        what run.json records for a later --resume to recognise the result (journal.fingerprint); series, t: the
        file's image and time point to count (one job of `--series all`, `--t all`), else the counter's own."""
        run_info = self.run_info if fingerprint is None else replace(self.run_info, fingerprint=fingerprint)
        return count_slide(Path(slide), Path(folder), self.protocol, self.detector, self.tissue, mpp=self.mpp,
                           progress=progress, run_info=run_info, model_diameter_px=self.model_diameter_px,
                           diameter_px=self.diameter_px, journal=journal, band_rows=band_rows, regions=self.regions,
                           skip_unreadable=self.skip_unreadable, micron_scale=self.micron_scale, z=self.z,
                           series=self.series if series is None else series, t=self.t if t is None else t)


def mask_threshold_for(bundle, protocol: Protocol) -> float:
    """The mask probability threshold a count uses: the protocol's when it sets one, else the bundle's for the
    protocol's modality (chosen on held-out images: a bundle's masks are only as tight as its own threshold makes
    them), else the bundle's default."""
    return protocol.mask_threshold if protocol.mask_threshold is not None else bundle.mask_threshold_for(protocol.modality)


def model_record(bundle, protocol: Protocol, tta: bool) -> dict:
    """run.json's "model": the bundle (bundle.Bundle) and the score thresholds a protocol gets from it, for a slide
    whose network input has colour and for one without (planning.NetworkInput.gray): the protocol's own for both
    when it sets one, else the bundle's for the protocol's modality (and TTA). Each slide's run.json adds the one
    it was counted at (results.run_record). The mask threshold likewise: the protocol's, else the bundle's."""
    if protocol.score_threshold is not None:
        threshold = gray_threshold = protocol.score_threshold
    else:
        threshold = bundle.threshold_for(protocol.modality, tta=tta)
        gray_threshold = bundle.threshold_for(protocol.modality, tta=tta, gray=True)
    micron = bundle.micron_scale(protocol.modality)
    return {"name": bundle.name, "path": str(bundle.path), "weights_sha256": bundle.weights_sha256,
            "score_thresholds": {"colour": float(threshold), "gray": float(gray_threshold)},
            "mask_threshold": float(mask_threshold_for(bundle, protocol)),
            # the bundle's scale in µm for the protocol's modality (bundles.MicronScale), None without one
            "micron_scale": micron.to_dict() if micron is not None else None,
            "test_time_augmentation": tta}


def counting_settings(protocol: Protocol, model: dict | None, mpp: float | None,
                      diameter_px: float | str | None, regions: RegionFile | None = None,
                      z: int | str | None = None, series: int | None = None, t: int | None = None) -> dict:
    """The settings a count's cells depend on, for journal.fingerprint (where the bundle lies does not count)."""
    options = {"mpp": mpp, "diameter_px": diameter_px}
    if regions is not None:       # a count without regions keeps the fingerprint it always had
        options["regions"] = regions.digest()
    if z is not None:             # and one of a 2-D image likewise
        options["z"] = z
    if series is not None:        # and one of a file's first image
        options["series"] = series
    if t is not None:             # and one without time points
        options["t"] = t
    return {"protocol": protocol.to_dict(), "model": {k: v for k, v in (model or {}).items() if k != "path"},
            "options": options}


@dataclass(frozen=True)
class CounterSpec:
    """CellCounter.load's arguments as plain, picklable data: a Dask worker loads its own counter from it, once
    (run/distributed.py). `settings()` gives CellCounter.settings() without building the network."""

    protocol: Protocol
    device: str = "auto"
    diameter_px: float | str | None = DEFAULT_SCALE
    mpp: float | None = None
    tta: bool = False
    run_info: RunInfo = field(default_factory=RunInfo)
    regions: RegionFile | None = None
    skip_unreadable: bool = False
    z: int | str | None = None
    series: int | None = None
    t: int | None = None

    def load(self) -> CellCounter:
        return CellCounter.load(self.protocol, self.device, diameter_px=self.diameter_px, mpp=self.mpp,
                                run_info=self.run_info, tta=self.tta, regions=self.regions,
                                skip_unreadable=self.skip_unreadable, z=self.z, series=self.series, t=self.t)

    def settings(self) -> dict:
        from ..bundles import load_bundle
        model = model_record(load_bundle(self.protocol.model), self.protocol, self.tta)
        return counting_settings(self.protocol, model, self.mpp, self.diameter_px, self.regions, self.z, self.series,
                                 self.t)

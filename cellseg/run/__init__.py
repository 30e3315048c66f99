"""Running counts: the CellCounter, one slide's SlideRun, jobs of slides, journals for --resume, Dask
and the time estimate.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "cohort": ["count_serially"],
    "counter": ["CellCounter", "CounterSpec", "counting_settings"],
    "distributed": ["connect", "count_on_dask"],
    "estimate": ["estimate_count"],
    "journal": ["Journal", "done_bands", "load_band", "load_plan", "save_band", "save_plan"],
    "pipeline": ["NucleusEmitter", "SlideRun", "merge_tiles"],
})

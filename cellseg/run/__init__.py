"""Running counts: the CellCounter, one slide's SlideRun, jobs of slides, journals for --resume, Dask
and the time estimate.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "CellCounter": "counter",
    "CounterSpec": "counter",
    "Journal": "journal",
    "NucleusEmitter": "pipeline",
    "SlideRun": "pipeline",
    "connect": "distributed",
    "count_on_dask": "distributed",
    "count_serially": "cohort",
    "counting_settings": "counter",
    "done_bands": "journal",
    "estimate_count": "estimate",
    "load_band": "journal",
    "load_plan": "journal",
    "merge_tiles": "pipeline",
    "save_band": "journal",
    "save_plan": "journal",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

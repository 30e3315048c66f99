"""cellseg: count and measure cells in microscopy and pathology images of any size.

The packages, bottom layer first (each imports only from the ones before it; tests/test_imports.py checks):
util, geometry, slides, bundles, tissue, cells, planning, detection, results, run, evaluation, training; then the
command line (cli.py, describe.py). `cellseg.CellCounter` (cellseg.run.CellCounter) is the entry point for code.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import cellseg` (and `cellseg --help`) stays instant.
    if name == "CellCounter":
        from .run.counter import CellCounter
        return CellCounter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

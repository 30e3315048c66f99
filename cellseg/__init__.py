"""cellseg: count and measure cells in microscopy and pathology images of any size."""

__version__ = "0.1.0"

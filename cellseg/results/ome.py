"""OME-TIFF metadata for the TIFFs cellseg writes (the label pyramids, the napari widget's region copies):
the OME-XML axes and pixel size, and the TIFF resolution tags that match it."""

from __future__ import annotations


def ome_metadata(axes: str, mpp: float | None) -> dict:
    """tifffile's `metadata=` for an OME-TIFF with these axes ("YX", "YXS", ...): PhysicalSizeX/Y = `mpp` µm when
    the pixel size is known."""
    metadata: dict = {"axes": axes}
    if mpp:
        metadata.update(PhysicalSizeX=float(mpp), PhysicalSizeXUnit="µm",
                        PhysicalSizeY=float(mpp), PhysicalSizeYUnit="µm")
    return metadata


def resolution_tags(mpp: float | None, downsample: int = 1) -> dict:
    """tifffile's `resolution=`/`resolutionunit=` for pixels of `mpp` µm seen `downsample` times smaller (a pyramid
    level); nothing when the pixel size is unknown."""
    if not mpp:
        return {}
    px_per_cm = 1e4 / (mpp * downsample)
    return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}

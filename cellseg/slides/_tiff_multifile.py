"""Acquisitions that tifffile reads from several files, for the tifffile backend (_tiff.py): a multi-file OME-TIFF
(the OME-XML of the whole set in every file, planes placed by TiffData UUID and FileName) and a Micro-Manager stack
read through its own index map (the positions an axis of one image, its files found by their name's prefix). Which
image or position a file is, where their planes are, and which files are missing: said, never read as zeros."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .base import other_images_warning


@dataclass(frozen=True)
class FileSet:
    """Where the images of a multi-file OME-TIFF are (each file holding the OME-XML of the whole set, as OME writers
    write a file per position, or start a new file every 4 GB; a Micro-Manager file, with its own index map, is read
    as MicroManagerStack instead): for each of the OME-XML's images, the file of each of its planes. tifffile reads
    on without a missing file: an image wholly in missing files is dropped, which renumbers the rest, and the planes
    of an image read that were in one are zeros."""

    path: Path                                  # the file opened
    names: tuple[str | None, ...]               # the OME-XML's images' names (tifffile's series names)
    files: tuple[tuple[str, ...], ...]          # for each image, the file of each of its planes, in order

    @classmethod
    def of(cls, tf, path: Path) -> FileSet | None:
        """The set `path` is a file of, None if it is not (not read as OME, or every plane in the file itself). A
        Micro-Manager file with its own index map is read by tifffile's MMStack reader instead, positions an axis."""
        if not tf.is_ome or not tf.series or tf.series[0].kind != "ome":
            return None
        try:
            root = ET.fromstring(tf.ome_metadata)
        except ET.ParseError:
            return None      # said where the pixel size is read
        own = root.get("UUID")
        images = [el for el in root if _tag(el) == "Image"]
        files = tuple(tuple(_plane_file(data, own, path.name) for data in image.iter() if _tag(data) == "TiffData")
                      for image in images)
        if all(name == path.name for planes in files for name in planes):
            return None
        return cls(path, tuple(image.get("Name") for image in images), files)

    @cached_property     # files looked for once an opening
    def missing(self) -> dict[int, list[str]]:
        """The files not beside the one opened, by the image they hold planes of."""
        gone = {k: sorted({name for name in planes if not (self.path.parent / name).is_file()})
                for k, planes in enumerate(self.files)}
        return {k: names for k, names in gone.items() if names}

    @property
    def own_image(self) -> int:
        """The image this file is the file of: the first whose first plane is in it, else the first with a plane in
        it (a file Micro-Manager continued an image in), else 0."""
        mine = self.path.name
        first = [k for k, planes in enumerate(self.files) if planes and planes[0] == mine]
        some = [k for k, planes in enumerate(self.files) if mine in planes]
        return (first or some or [0])[0]

    @property
    def paths(self) -> tuple[str, ...]:
        """Every file of the set (absolute paths, sorted): the set's identity, whichever file was opened."""
        names = {name for planes in self.files for name in planes} | {self.path.name}
        return tuple(sorted(str(self.path.absolute().parent / name) for name in names))

    @cached_property     # files looked for once an opening
    def _found(self) -> list[int]:
        """The images tifffile makes a series of, in order: those with a plane in a file that is there."""
        return [k for k, planes in enumerate(self.files)
                if any((self.path.parent / name).is_file() for name in planes)]

    def series_of(self, index: int, tf) -> int:
        """tifffile's series number of the OME-XML's image `index`; a SlideError where a file holding planes of it
        is missing (tifffile would drop it, or read those planes as zeros)."""
        if missing := self.missing.get(index):
            raise SlideError(f"expected every file of the multi-file OME-TIFF {self.path.name} beside it, "
                             f"{_missing_text(missing, self.path)}: image {index} ({self.names[index]}), the one "
                             f"read, has planes in {'it' if len(missing) == 1 else 'them'}")
        found = self._found
        if index not in found:
            raise SlideError(f"expected planes of image {index} in {self.path.name}'s set, its OME-XML puts none of "
                             f"them in a file")
        number = found.index(index)
        if len(found) != len(tf.series) or tf.series[number].name != self.names[index]:
            raise SlideError(f"expected {self.path.name}'s images where its OME-XML puts them, tifffile reads "
                             f"{len(tf.series)} of its {len(self.files)} images otherwise")
        return number

    def image_of(self, number: int) -> int:
        """The OME-XML's image number of tifffile's series `number`."""
        return self._found[number]

    def describe(self, index: int) -> str:
        """The details line of `cellseg info`."""
        files = len(self.paths)
        if self.files[index] and self.files[index][0] != self.path.name:
            return (f"image {index} continues here from {self.files[index][0]} (a multi-file OME-TIFF of {files} "
                    f"files); every plane of it is read, from the file it is in")
        return (f"a multi-file OME-TIFF of {files} files, {len(self.files)} images; each image is read from the "
                f"files its planes are in; --series N reads another, --series all every one")

    def warnings(self, index: int, chosen: bool) -> tuple[str, ...]:
        said = []
        if not chosen and self.files[index] and self.files[index][0] != self.path.name:
            said.append(f"{self.path.name} continues image {index} ({self.names[index]}) of a multi-file OME-TIFF "
                        f"whose first planes are in {self.files[index][0]}: that image is counted, all its planes "
                        f"(a count of both files would count it twice; a batch of both counts it once)")
        if missing := self.missing:
            said.append(f"{self.path.name} is one file of a multi-file OME-TIFF; {_missing_text(missing, self.path)}, "
                        f"so the images in them are not read (image {index}, counted, is whole)")
        return tuple(said)


@dataclass(frozen=True, eq=False)
class MicroManagerStack:
    """A Micro-Manager stack as tifffile's MMStack reader reads it (its index map, not the OME-XML): one image from
    the acquisition's files, found by their name's prefix (Micro-Manager writes a file per stage position by default,
    or all in one file, and another file every 4 GB), whose axis R, where there are several, is the position,
    numbered as Micro-Manager does."""

    path: Path                         # the file opened
    labels: tuple[str, ...]            # each position's label (Micro-Manager's StagePositions), R's order; one
    own: int                           # the position this file holds (its first), 0 for one file of all
    files: tuple[str, ...]             # the files the positions' planes are in (absolute paths, sorted)
    frame_axes: str                    # the image's axes but the plane's (e.g. "RTZC" squeezed to "RT")
    absent: np.ndarray                 # over frame_axes: planes in no file found (tifffile zeroes them)

    @classmethod
    def of(cls, tf, path: Path) -> MicroManagerStack | None:
        image = tf.series[0] if tf.series else None
        if image is None or image.kind != "mmstack":
            return None
        sizes = dict(zip(image.axes, image.shape))
        count = sizes.get("R", 1)
        frames = [(ax, n) for ax, n in sizes.items() if ax not in image.keyframe.axes]
        absent = np.array([page is None for page in image.pages]).reshape([n for _, n in frames])
        meta = tf.micromanager_metadata or {}
        stored = [p.get("Label") for p in meta.get("Summary", {}).get("StagePositions", []) if isinstance(p, dict)]
        labels = tuple(stored) if len(stored) == count and all(stored) else tuple(f"Pos{k}" for k in range(count))
        mine = sorted({int(k) for k in meta["IndexMap"][:, 3]}) if "IndexMap" in meta else [0]
        files = tuple(sorted({str(Path(page.parent.filehandle.path).absolute())
                              for page in image.pages if page is not None}))
        return cls(path, labels, mine[0] if mine[0] < count else 0, files, "".join(ax for ax, _ in frames), absent)

    @property
    def count(self) -> int:
        return len(self.labels)

    @property
    def missing(self) -> list[int]:
        """The positions none of whose planes are in a file found."""
        if "R" not in self.frame_axes:
            return []
        others = tuple(k for k, ax in enumerate(self.frame_axes) if ax != "R")
        return [int(k) for k in np.flatnonzero(self.absent.all(axis=others))]

    def check(self, index: int, z: int | str | None, t: int | None) -> None:
        """Refuse to read planes that are in no file found (tifffile would read them as zeros): a file of the
        acquisition left behind, or time points an acquisition stopped early never took."""
        chosen = tuple(index if ax == "R" else (t or 1) - 1 if ax == "T" else z - 1 if ax == "Z" and isinstance(z, int)
                       else slice(None) for ax in self.frame_axes)
        if self.absent[chosen].any():
            what = ", ".join(([f"position {index} ({self.labels[index]})"] if "R" in self.frame_axes else [])
                             + ([f"time point {t}"] if t is not None and "T" in self.frame_axes else []))
            raise SlideError(f"expected the planes of {what or 'the image'} in the files of "
                             f"the Micro-Manager acquisition {self.path.name} is one of, they are in none of the "
                             f"{len(self.files)} found in {self.path.absolute().parent}: a file of it is not there, "
                             f"or the acquisition stopped before taking them")

    def describe(self, index: int, chosen: bool) -> str:
        return (f"position {index} of 0-{self.count - 1}{' (--series)' if chosen else ''}: {self.labels[index]}, "
                f"of a Micro-Manager acquisition in {len(self.files)} file(s); --series N reads another, --series "
                f"all every one")

    def warnings(self, index: int, chosen: bool) -> tuple[str, ...]:
        said = []
        if not chosen and len(self.files) == 1 and self.count > 1:     # all positions here: the others left out
            said.append(other_images_warning(self.path, list(self.labels), "Micro-Manager positions", 0,
                                             self.count - 1))
        if others := [k for k in self.missing if k != index]:
            said.append(f"{self.path.name} is one file of a Micro-Manager acquisition whose files for position(s) "
                        f"{', '.join(map(str, others))} are not in {self.path.absolute().parent}: not read")
        return tuple(said)


def _tag(element) -> str:
    return element.tag.rsplit("}", 1)[-1]


def _plane_file(tiff_data, own_uuid: str | None, own_name: str) -> str:
    """The file a TiffData element's planes are in: its UUID's FileName, the file itself where the UUID is the
    file's own (a renamed file is still found by it) or there is none."""
    uuid = next((el for el in tiff_data if _tag(el) == "UUID"), None)
    if uuid is None or (uuid.text or "").strip() == own_uuid or not uuid.get("FileName"):
        return own_name
    return uuid.get("FileName")


def _missing_text(missing: dict[int, list[str]] | list[str], path: Path) -> str:
    if isinstance(missing, dict):
        missing = sorted({name for names in missing.values() for name in names})
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return f"{shown} {'is' if len(missing) == 1 else 'are'} not in {path.absolute().parent}"

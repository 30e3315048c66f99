"""Multi-file acquisitions. A multi-file OME-TIFF (Micro-Manager writes a file per position and starts another every
4 GB): each image and plane is read from the file of the set its OME-XML puts it in, whichever file is opened, and a
file missing from the set is said, not read as zeros or silently renumbering the images. A Micro-Manager stack read
through its own index map (tifffile's MMStack reader, the positions an axis of one image): its positions are
--series numbers, a file is read as its own position, and planes in no file found are refused, not read as zeros."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cellseg.cli import images_to_count
from cellseg.errors import SlideError
from cellseg.slides import open_slide
from cellseg.slides.base import Box

from ..helpers import write_micromanager_stack, write_multi_file_ome


def positions(frames: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [(rng.integers(0, 4000, (frames, 64, 80)) + 1000 * p).astype(np.uint16) for p in range(2)]


def read(path, **choice) -> np.ndarray:
    with open_slide(path, **choice) as slide:
        return slide.read_region(Box(0, 0, slide.info.height, slide.info.width))[..., 0]


@pytest.mark.parametrize("layout", ["planes", "contiguous", "tiled"])
def test_each_position_is_read_from_its_own_file_whichever_file_is_opened(tmp_path, layout):
    stacks = positions(1)      # one plane a position: a tiled one is read tile by tile from its file
    files = write_multi_file_ome(tmp_path, "plate", [s[:1] for s in stacks], layout=layout)
    for opened in files:
        for k, stack in enumerate(stacks):
            assert np.array_equal(read(opened, series=k), stack[0]), (opened.name, k)
    for k, opened in enumerate(files):    # without --series a file is read as its own position, not the first
        assert np.array_equal(read(opened), stacks[k][0])
        with open_slide(opened) as slide:
            info = slide.info
        assert (info.series, info.positions, info.mpp, info.channel_names) == (k or None, (0, 1), 0.5, ("DAPI",))
        assert info.warnings == () and info.file_set == tuple(str(f) for f in files)
        assert info.details == (f"image {k} of 0-1: Pos{k}", "a multi-file OME-TIFF of 2 files, 2 images; each "
                                "image is read from the files its planes are in; --series N reads another, --series "
                                "all every one")


@pytest.mark.parametrize("layout", ["planes", "contiguous"])
def test_a_position_split_over_two_files_reads_every_time_point(tmp_path, layout):
    stacks = positions(3)
    files = write_multi_file_ome(tmp_path, "movie", stacks, layout=layout, split_from=2)
    assert [f.name for f in files] == ["movie_MMStack_Pos0.ome.tif", "movie_MMStack_Pos0_1.ome.tif",
                                       "movie_MMStack_Pos1.ome.tif", "movie_MMStack_Pos1_1.ome.tif"]
    for k, stack in enumerate(stacks):
        for t in (1, 2, 3):
            assert np.array_equal(read(files[0], series=k, t=t), stack[t - 1]), (k, t)
    # the file Micro-Manager continued position 1 in, opened: position 1, every time point, said
    assert np.array_equal(read(files[3], t=1), stacks[1][0])
    with open_slide(files[3], t=3) as slide:
        assert slide.info.series == 1 and slide.info.warnings == (
            "movie_MMStack_Pos1_1.ome.tif continues image 1 (Pos1) of a multi-file OME-TIFF whose first planes are in "
            "movie_MMStack_Pos1.ome.tif: that image is counted, all its planes (a count of both files would count it "
            "twice; a batch of both counts it once)",)


def test_a_file_missing_from_the_set_is_said_not_read_as_zeros(tmp_path, caplog):
    stacks = positions(3)
    first, continued, second, second_continued = write_multi_file_ome(tmp_path, "movie", stacks, split_from=2)
    second.unlink()      # position 1's files: tifffile drops that image
    second_continued.unlink()
    with caplog.at_level(logging.WARNING), open_slide(first, t=1) as slide:    # position 0 is whole: counted, said
        assert slide.info.warnings == (f"movie_MMStack_Pos0.ome.tif is one file of a multi-file OME-TIFF; "
                                       f"movie_MMStack_Pos1.ome.tif, movie_MMStack_Pos1_1.ome.tif are not in {tmp_path}, "
                                       f"so the images in them are not read (image 0, counted, is whole)",)
    assert not [r for r in caplog.records if "failed to read" in r.getMessage()]     # tifffile's lines: said once
    with pytest.raises(SlideError, match=r"^expected every file of the multi-file OME-TIFF movie_MMStack_Pos0.ome.tif "
                                         r"beside it, movie_MMStack_Pos1.ome.tif, movie_MMStack_Pos1_1.ome.tif are "
                                         r"not in .*: image 1 \(Pos1\), the one read, has planes in them$"):
        open_slide(first, series=1, t=1)
    continued.unlink()   # position 0's last time point: its plane would be zeros
    with pytest.raises(SlideError, match=r"^expected every file of the multi-file OME-TIFF movie_MMStack_Pos0.ome.tif "
                                         r"beside it, movie_MMStack_Pos0_1.ome.tif is not in .*: image 0 \(Pos0\), "
                                         r"the one read, has planes in it$"):
        open_slide(first, t=1)


def test_a_position_s_file_on_its_own_is_read_as_that_position(tmp_path):
    """A file of a Micro-Manager 1.4 set holds the OME-XML of all: position 1's file without position 0's is still
    position 1 (tifffile numbers it 0 then), and position 0 is said to be missing."""
    stacks = positions(1)
    first, second = write_multi_file_ome(tmp_path, "plate", [s[:1] for s in stacks])
    first.unlink()
    assert np.array_equal(read(second), stacks[1][0])
    with open_slide(second) as slide:
        assert (slide.info.series, slide.info.positions, slide.info.mpp) == (1, (), 0.5)
        assert "plate_MMStack_Pos0.ome.tif is not in" in slide.info.warnings[0]
    assert np.array_equal(read(second, series=1), stacks[1][0])
    with pytest.raises(SlideError, match=r"plate_MMStack_Pos0.ome.tif is not in .*: image 0 \(Pos0\), the one read"):
        open_slide(second, series=0)


def test_a_truncated_file_of_the_set_is_named_when_opened(tmp_path):
    files = write_multi_file_ome(tmp_path, "plate", [s[:1] for s in positions(1)], layout="tiled")
    with open(files[1], "r+b") as f:     # position 1's file, cut in its pixels; the one opened is whole
        f.truncate(files[1].stat().st_size - 2000)
    with pytest.raises(SlideError, match=rf"^expected a complete TIFF, {files[1]} is truncated"):
        open_slide(files[0], series=1)
    assert np.array_equal(read(files[0], series=0), positions(1)[0][0])


@pytest.mark.parametrize("per_file, ome_xml", [(True, False), (False, False), (True, True)])
def test_a_micro_manager_stack_s_positions_are_read_as_its_series(tmp_path, per_file, ome_xml):
    """Micro-Manager 2's files also hold OME-XML (the whole acquisition in the first, BinaryOnly in the others): read
    and named as Micro-Manager's all the same."""
    stacks = positions(3) + [positions(3)[0] // 2]
    files = write_micromanager_stack(tmp_path, "run", stacks, per_file=per_file, ome_xml=ome_xml)
    for opened in files:
        for k, stack in enumerate(stacks):
            for t in (1, 3):
                assert np.array_equal(read(opened, series=k, t=t), stack[t - 1]), (opened.name, k, t)
    for k, opened in enumerate(files):    # without --series: the file's own position (all in one file: the first)
        assert np.array_equal(read(opened, t=2), stacks[k][1])
        with open_slide(opened, t=2) as slide:
            info = slide.info
        assert (info.format, info.series, info.positions, info.mpp) == ("micromanager-tiff", k or None, (0, 1, 2),
                                                                          0.5)
        assert info.details == (f"position {k} of 0-2: Pos{k}, of a Micro-Manager acquisition in {len(files)} file(s); "
                                "--series N reads another, --series all every one",)
        assert info.file_set == (tuple(str(f) for f in files) if per_file else ())
        assert info.warnings == (() if per_file else (
            "run_MMStack.ome.tif holds 3 images like the one counted (Micro-Manager positions: Pos0, Pos1, Pos2): only "
            "the first, Pos0, is counted; to count another, pass --series N (0-2)",))


@pytest.mark.parametrize("ome_xml", [False, True])
def test_every_file_of_a_micro_manager_acquisition_has_its_pixel_size(tmp_path, ome_xml):
    """The pixel size Micro-Manager recorded, not its TIFF resolution (that rounded to whole pixels a centimetre:
    0.3250024 µm), so that every position of one acquisition is measured alike."""
    files = write_micromanager_stack(tmp_path, "run", positions(2), mpp=0.325, ome_xml=ome_xml)
    sources = []
    for opened in files:
        with open_slide(opened, t=1) as slide:
            assert slide.info.mpp == 0.325
            sources.append(slide.info.mpp_source)
    assert sources == (["ome", "micromanager"] if ome_xml else ["micromanager", "micromanager"])


def test_a_micro_manager_position_in_no_file_found_is_refused_not_read_as_zeros(tmp_path, caplog):
    stacks = positions(3) + [positions(3)[1] // 2]
    files = write_micromanager_stack(tmp_path, "run", stacks)
    files[1].unlink()
    with caplog.at_level(logging.WARNING), open_slide(files[0], series=2, t=1) as slide:
        assert np.array_equal(slide.read_region(Box(0, 0, 64, 80))[..., 0], stacks[2][0])
        assert slide.info.warnings == (f"run_MMStack_Pos0.ome.tif is one file of a Micro-Manager acquisition whose "
                                       f"files for position(s) 1 are not in {tmp_path}: not read",)
    assert not [r for r in caplog.records if "missing" in r.getMessage() and "tifffile" in r.getMessage()]
    with pytest.raises(SlideError, match=r"^expected the planes of position 1 \(Pos1\), time point 1 in the files of "
                                         r"the Micro-Manager acquisition run_MMStack_Pos0.ome.tif is one of, they are "
                                         r"in none of the 2 found in .*: a file of it is not there"):
        open_slide(files[0], series=1, t=1)


def test_a_micro_manager_acquisition_stopped_early_reads_the_time_points_it_took(tmp_path):
    stacks = positions(2)      # 2 time points taken of the 5 planned
    first, _ = write_micromanager_stack(tmp_path, "run", stacks, frames_planned=5)
    assert np.array_equal(read(first, series=1, t=2), stacks[1][1])
    with pytest.raises(SlideError, match=r"position 1 \(Pos1\), time point 3 .* or the acquisition stopped before"):
        open_slide(first, series=1, t=3)


def test_a_micro_manager_position_split_over_two_files_reads_as_one_and_a_missing_part_is_said(tmp_path):
    """Micro-Manager starts a new file every 4 GB: one position's time points in two files, read as one image
    whichever is opened; a batch of both counts it once; without its second file, time points there are refused."""
    stacks = positions(3)[:1]
    first, second = write_micromanager_stack(tmp_path, "run", stacks, split_from=2)
    assert second.name == "run_MMStack_Pos0_1.ome.tif"
    for opened in (first, second):
        for t in (1, 2, 3):
            assert np.array_equal(read(opened, t=t), stacks[0][t - 1]), (opened.name, t)
        with open_slide(opened, t=1) as slide:
            assert (slide.info.positions, slide.info.series, slide.info.t_points) == ((), None, 3)
            assert slide.info.file_set == (str(first), str(second))
    assert images_to_count((first, second), None, "all", None, None) == [(first, None, t) for t in (1, 2, 3)]
    (tmp_path / "two").mkdir()
    two = write_micromanager_stack(tmp_path / "two", "run", positions(3), split_from=2)
    two[1].unlink()      # position 0's second file
    assert np.array_equal(read(two[0], t=2), positions(3)[0][1])
    with pytest.raises(SlideError, match=r"^expected the planes of position 0 \(Pos0\), time point 3 in the files"):
        open_slide(two[0], t=3)
    assert np.array_equal(read(two[0], series=1, t=3), positions(3)[1][2])

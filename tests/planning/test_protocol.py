"""Protocols are data with a schema: shipped presets load, every mistake in a file is a ProtocolError that
names the file and the key, overrides are validated the same way and named by their keys; every setting is
declared once (SETTINGS), and the schema and Protocol's defaults are made from that."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import pytest
import tomllib

import cellseg.planning.protocol as protocol_module
from cellseg.errors import CellsegError, ParameterError, ProtocolError
from cellseg.planning import SCHEMA, SETTINGS, OneOf, Protocol, list_protocols, load_protocol, protocols_dir

SHIPPED = ("fluorescence-nuclei", "he-nuclei")

GOOD = """\
name = "mine"
description = "a test protocol"
modality = "fluorescence"

[input]
channel = 1
require_mpp = false

[tiling]
tile_size = 256
halo_px = 32
batch_size = 2

[detection]
model = "nuclei"
score_threshold = 0.7
mask_threshold = 0.5
min_area_px = 5

[seams]
dedupe_overlap = 0.4
"""


def write(tmp_path: Path, text: str, name: str = "mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def with_line(section: str, line: str) -> str:
    """GOOD with `line` added at the end of [section] ('' = top level), replacing the same key."""
    key = line.split("=")[0].strip()
    out, current = [], ""
    for text in GOOD.splitlines():
        if text.startswith("["):
            if current == section:
                out.insert(len(out) - 1 if out and out[-1] == "" else len(out), line)
            current = text.strip("[]")
        elif text.split("=")[0].strip() == key and current == section:
            continue
        out.append(text)
    if current == section:
        out.append(line)
    return "\n".join(out) + "\n"


# --- shipped protocols ---------------------------------------------------------------------------------

def test_shipped_protocols_are_listed():
    assert set(SHIPPED) <= set(list_protocols())
    assert list_protocols() == sorted(list_protocols())


@pytest.mark.parametrize("name", list_protocols())
def test_every_shipped_protocol_loads_and_matches_its_file(name):
    p = load_protocol(name)
    assert isinstance(p, Protocol)
    assert p.name == name  # the file's name = the name users type
    assert p.description
    assert 2 * p.halo_px <= p.tile_size
    assert Path(p.source).name == f"{name}.toml"
    raw = tomllib.loads(Path(p.source).read_text(encoding="utf-8"))
    assert p.to_dict() == raw  # nothing lost, nothing invented (every shipped file spells out its settings)


def test_he_protocol_requires_pixel_size_and_fluorescence_does_not():
    assert load_protocol("he-nuclei").require_mpp is True
    assert load_protocol("he-nuclei").modality == "brightfield"
    assert load_protocol("fluorescence-nuclei").require_mpp is False


def test_he_protocol_grows_cells_like_qupath_and_fluorescence_counts_nuclei():
    he, fluo = load_protocol("he-nuclei"), load_protocol("fluorescence-nuclei")
    assert (he.cell_expansion_um, he.cell_expansion_px) == (5.0, None)
    assert (fluo.cell_expansion_um, fluo.cell_expansion_px) == (0.0, None)


def test_protocols_are_found_through_importlib_resources():
    """From a wheel the presets live in the package cellseg.protocols, not in a checkout's protocols/."""
    folder = resources.files("cellseg.protocols")
    names = sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".toml"))
    assert names == list_protocols()
    assert Path(str(folder)) == protocols_dir()
    for name in SHIPPED:
        text = (folder / f"{name}.toml").read_text(encoding="utf-8")
        assert tomllib.loads(text)["name"] == name


def test_protocol_lookup_uses_the_package_resources(tmp_path, monkeypatch):
    """A name is resolved only via protocols_dir(): move it and the names follow."""
    write(tmp_path, GOOD.replace('name = "mine"', 'name = "elsewhere"'), "elsewhere.toml")
    monkeypatch.setattr(protocol_module, "protocols_dir", lambda: tmp_path)
    assert list_protocols() == ["elsewhere"]
    assert load_protocol("elsewhere").name == "elsewhere"
    with pytest.raises(ProtocolError, match="fluorescence-nuclei"):
        load_protocol("fluorescence-nuclei")


# --- a file of one's own -------------------------------------------------------------------------------

def test_a_valid_file_loads_every_value(tmp_path):
    path = write(tmp_path, GOOD)
    p = load_protocol(path)
    assert (p.name, p.channel, p.tile_size, p.halo_px, p.batch_size) == ("mine", 1, 256, 32, 2)
    assert (p.score_threshold, p.min_area_px, p.dedupe_overlap) == (0.7, 5, 0.4)
    assert p.source == str(path)
    assert load_protocol(str(path)) == p  # a str path works like a Path


def test_missing_sections_take_defaults(tmp_path):
    p = load_protocol(write(tmp_path, 'name = "bare"\n'))
    assert p == Protocol(name="bare", source=p.source)


@pytest.mark.parametrize("text, words", [
    # unknown key in a section
    (with_line("tiling", "tile_szie = 256"), ("'tile_szie'", "[tiling]", "tile_size")),
    # unknown key at the top level
    (with_line("", 'author = "me"'), ("'author'",)),
    # unknown section
    (GOOD + "\n[postprocess]\nsmooth = true\n", ("[postprocess]", "unknown section", "[tiling]")),
    # wrong types
    (with_line("tiling", 'tile_size = "big"'), ("tile_size", "expected int", "'big'")),
    (with_line("input", "require_mpp = 1"), ("require_mpp", "expected bool", "got 1")),
    (with_line("tiling", "batch_size = true"), ("batch_size", "expected int", "True")),
    (with_line("tiling", "tile_size = 256.0"), ("tile_size", "expected int", "256.0")),
    (with_line("detection", "score_threshold = \"high\""), ("score_threshold", "expected int or float")),
    (with_line("", "modality = \"xray\""), ("modality", "'fluorescence'", "'xray'")),
    # out of range
    (with_line("tiling", "tile_size = 10"), ("tile_size", "between 64 and 8192", "got 10")),
    (with_line("detection", "score_threshold = 1.5"), ("score_threshold", "between 0.0 and 1.0", "1.5")),
    (with_line("detection", "score_threshold = nan"), ("score_threshold", "between 0.0 and 1.0", "nan")),
    (with_line("seams", "dedupe_overlap = inf"), ("dedupe_overlap", "inf")),
    (with_line("input", "channel = -1"), ("channel", ">= 0", "-1")),
    (with_line("seams", "dedupe_overlap = -0.1"), ("dedupe_overlap", "-0.1")),
    # halo larger than half a tile
    (with_line("tiling", "halo_px = 200"), ("halo_px", "tile size / 2 = 128", "got 200")),
])
def test_bad_file_raises_protocol_error_naming_file_and_key(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ProtocolError) as info:
        load_protocol(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)
    assert "\n" not in message
    assert info.value.exit_code == 1


def test_a_byte_order_mark_is_read_past_and_an_endless_gzip_threshold_refused(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())           # as Windows editors save UTF-8
    assert load_protocol(path).name == "mine"
    with pytest.raises(ProtocolError, match="geojson_gzip_above_mb"):
        load_protocol(write(tmp_path, GOOD + "\n[export]\ngeojson_gzip_above_mb = 1e308\n"))


def test_a_relative_model_path_is_read_from_the_protocol_files_folder(tmp_path, monkeypatch):
    (tmp_path / "protos" / "bundles" / "mine").mkdir(parents=True)
    path = tmp_path / "protos" / "p.toml"
    path.write_text(GOOD.replace('model = "nuclei"', 'model = "bundles/mine"'))
    monkeypatch.chdir(tmp_path)                                          # not the file's folder
    protocol = load_protocol(path)
    assert protocol.model == str((tmp_path / "protos" / "bundles" / "mine").resolve())
    assert protocol.source == str(path.resolve())
    assert load_protocol(write(tmp_path, GOOD)).model == "nuclei"        # a shipped name stays a name


def test_helper_really_changes_the_file():
    """The parametrised cases above are only meaningful if with_line() edits GOOD."""
    text = with_line("tiling", "tile_size = 10")
    assert tomllib.loads(text)["tiling"]["tile_size"] == 10
    assert tomllib.loads(text)["tiling"]["halo_px"] == 32
    assert tomllib.loads(with_line("", 'author = "me"'))["author"] == "me"


@pytest.mark.parametrize("text, words", [
    ("name = \n", ("not valid TOML",)),
    ('description = "no name"\n', ("missing key 'name'",)),
    ('name = "x"\ninput = 3\n', ("'input'",)),
])
def test_broken_or_incomplete_file(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ProtocolError) as info:
        load_protocol(path)
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ProtocolError) as info:
        load_protocol("bogus")
    for name in SHIPPED:
        assert name in str(info.value)
    assert "'bogus'" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ProtocolError, match="no such protocol file"):
        load_protocol(tmp_path / "nope.toml")


# --- Protocol.replace: command-line overrides ----------------------------------------------------------

def test_replace_applies_overrides_and_keeps_none():
    base = load_protocol("fluorescence-nuclei")
    p = base.replace(tile_size=128, halo_px=16, batch_size=None, model="/some/bundle", score_threshold=0.3)
    assert (p.tile_size, p.halo_px, p.model, p.score_threshold) == (128, 16, "/some/bundle", 0.3)
    assert p.batch_size == base.batch_size and p.name == base.name
    assert base.tile_size == 512  # the original is unchanged (frozen)
    assert p.to_dict()["tiling"] == {"tile_size": 128, "halo_px": 16}     # batch_size unset: the device's
    assert p.replace(batch_size=8).to_dict()["tiling"] == {"tile_size": 128, "halo_px": 16, "batch_size": 8}


@pytest.mark.parametrize("overrides, words", [
    ({"tile_size": 10}, ("tile_size", "between 64 and 8192", "got 10")),
    ({"tile_size": "big"}, ("tile_size", "expected int", "'big'")),
    ({"halo_px": -1}, ("halo_px", "got -1")),
    ({"batch_size": 0}, ("batch_size", "got 0")),
    ({"channel": -2}, ("channel", "got -2")),
    ({"score_threshold": 2.0}, ("score_threshold", "2.0")),
    ({"mask_threshold": "high"}, ("mask_threshold", "expected int or float", "'high'")),
    ({"tissue_method": "magic"}, ("tissue_method", "one of 'unet', 'otsu', 'none'", "'magic'")),
    ({"tile_size": 128, "halo_px": 100}, ("halo", "at most", "64", "got 100")),
    ({"halo_px": 300}, ("halo", "at most", "256", "got 300")),  # against the protocol's own tile size
])
def test_replace_validates_overrides_as_usage_errors_named_by_key(overrides, words):
    """The napari widget shows these messages too: they name protocol keys, not `cellseg count`'s flags."""
    base = load_protocol("fluorescence-nuclei")
    with pytest.raises(ParameterError) as info:
        base.replace(**overrides)
    assert info.value.exit_code == 2
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert "--" not in str(info.value)


def test_cell_expansion_in_um_or_px(tmp_path):
    p = load_protocol(write(tmp_path, GOOD + "\n[cells]\ncell_expansion_um = 5\n"))
    assert (p.cell_expansion_um, p.cell_expansion_px) == (5, None)
    assert p.to_dict()["cells"] == {"cell_expansion_um": 5}
    p = load_protocol(write(tmp_path, GOOD + "\n[cells]\ncell_expansion_px = 8.5\n"))
    assert (p.cell_expansion_um, p.cell_expansion_px) == (0.0, 8.5)
    assert load_protocol(write(tmp_path, GOOD)).cell_expansion_um == 0.0        # default: nuclei only
    with pytest.raises(ProtocolError, match=r"\[cells\] expected cell_expansion_um or cell_expansion_px, got both"):
        load_protocol(write(tmp_path, GOOD + "\n[cells]\ncell_expansion_um = 5\ncell_expansion_px = 8\n"))
    with pytest.raises(ProtocolError, match=r"\[cells\] cell_expansion_um: expected between 0.0 and 100.0, got -1"):
        load_protocol(write(tmp_path, GOOD + "\n[cells]\ncell_expansion_um = -1\n"))


def test_replace_cell_expansion_in_one_unit_drops_the_other():
    base = load_protocol("he-nuclei").replace(cell_expansion_um=5.0)
    in_px = base.replace(cell_expansion_px=10.0)
    assert (in_px.cell_expansion_um, in_px.cell_expansion_px) == (0.0, 10.0)
    in_um = in_px.replace(cell_expansion_um=3.0)
    assert (in_um.cell_expansion_um, in_um.cell_expansion_px) == (3.0, None)
    with pytest.raises(ParameterError, match="got both"):
        base.replace(cell_expansion_um=2.0, cell_expansion_px=4.0)
    with pytest.raises(ParameterError, match="cell_expansion_um: .*got -3"):
        base.replace(cell_expansion_um=-3.0)


def test_replace_rejects_unknown_setting():
    with pytest.raises(CellsegError, match="unknown protocol setting 'tile'"):
        load_protocol("fluorescence-nuclei").replace(tile=128)


def test_schema_and_dataclass_agree():
    """Every schema key is a Protocol field, so to_dict/replace cannot silently drop one."""
    fields = set(Protocol.__dataclass_fields__) - {"source"}
    schema_keys = {key for keys in SCHEMA.values() for key in keys}
    assert schema_keys == fields == set(SETTINGS)


def test_each_setting_is_declared_once_and_the_rest_is_made_from_it():
    """Protocol's fields and defaults, the file's sections and the checks all come from SETTINGS."""
    fields = {f.name: f for f in dataclasses.fields(Protocol)}
    for key, setting in SETTINGS.items():
        assert setting.key == key and SCHEMA[setting.section][key] is setting
        assert fields[key].default is setting.default, key
    assert list(fields) == [*SETTINGS, "source"]
    assert Protocol(name="x").tile_size == SETTINGS["tile_size"].default == 512
    assert list(SCHEMA) == ["", "input", "tiling", "detection", "tissue", "seams", "cells", "export"]


def test_required_settings_have_no_default_and_optional_ones_say_none():
    assert SETTINGS["name"].default is dataclasses.MISSING
    with pytest.raises(TypeError):
        Protocol()
    assert Protocol.__dataclass_fields__["score_threshold"].type == "float | None"
    assert Protocol.__dataclass_fields__["min_area_px"].type == "int"


def test_tissue_methods_are_the_tissue_finders_own():
    """One list of tissue methods: the finders', which the schema and the CLI take."""
    from cellseg.tissue.finder import METHODS, TissueFinder
    assert SETTINGS["tissue_method"].allowed == OneOf(tuple(METHODS))
    with pytest.raises(ParameterError, match="expected a tissue method among unet, otsu, none, got 'magic'"):
        TissueFinder("magic")


def test_presets_are_found_from_a_source_tree_without_an_install(monkeypatch):
    """cellseg on PYTHONPATH (a lent GPU machine): no cellseg.protocols package, the checkout's protocols/ instead."""
    from importlib import resources

    import cellseg.planning.protocol as protocol_module

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")
    monkeypatch.setattr(resources, "files", missing)
    assert (protocol_module.protocols_dir() / "fluorescence-nuclei.toml").is_file()
    assert protocol_module.load_protocol("fluorescence-nuclei").name == "fluorescence-nuclei"

"""Model bundles on disk: model.toml, weights, card; one lookup for shipped names and folders. The network
itself is built in cellseg.detection.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "BUNDLE_FORMAT": "bundle",
    "Bundle": "bundle",
    "BundleKind": "bundle",
    "ModelConfig": "bundle",
    "find_bundle": "bundle",
    "interpolate_bundles": "bundle",
    "load_bundle": "bundle",
    "packaged_bundles_root": "bundle",
    "read_bundle_folder": "bundle",
    "read_weights": "bundle",
    "save_bundle": "bundle",
    "sha256_file": "bundle",
    "shipped_bundle_names": "bundle",
    "update_bundle_metadata": "bundle",
    "write_toml": "bundle",
    "write_weights": "bundle",
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

"""Model bundles on disk: model.toml, weights, card; one lookup for shipped names and folders. The network
itself is built in cellseg.detection.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "bundle": [
        "BUNDLE_FORMAT", "Bundle", "GRAY_SUFFIX", "BundleKind", "MicronScale", "ModelConfig", "find_bundle",
        "average_bundles", "interpolate_bundles", "load_bundle", "packaged_bundles_root", "read_bundle_folder", "read_weights",
        "save_bundle", "sha256_file", "shipped_bundle_names", "update_bundle_metadata", "update_bundle_scale",
        "write_toml", "write_weights",
    ],
})

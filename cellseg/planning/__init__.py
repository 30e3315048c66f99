"""Before any detection: the protocol (every setting), the slide's plan (tiles, tissue, intensity,
scale, windows), network input, and the annotated regions to count in.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "intensity": [
        "GRAY_INPUT_CHROMA", "IntensityRange", "gray_input", "measure_range", "select_channels", "to_network_input",
    ],
    "modality": ["Look", "images_warning", "modality_warning", "slide_look"],
    "plan": [
        "DEFAULT_SCALE", "NATIVE_WITHIN", "Calibration", "NetworkInput", "Scale", "SlidePlan", "calibrate", "calibration_windows",
        "choose_scale", "decide_scale", "measure_diameter", "model_channel", "network_nucleus_px", "plan_slide",
        "pixel_size_diameter",
        "tile_geometry", "tissue_input", "tissue_pixels",
    ],
    "protocol": [
        "FileList", "OUTPUT_FILES", "OneOf", "Protocol", "Range", "SCHEMA", "SETTINGS", "Setting", "check_pixel_size",
        "list_protocols", "load_protocol", "protocols_dir", "tiles_per_pass",
    ],
    "regions": ["RegionFile", "Regions", "RegionsError", "load_regions"],
})

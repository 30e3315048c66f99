"""Small helpers every layer may use: background threads, returning freed memory, stage timers, progress bars.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "children": ["child_pipes", "end_child", "import_path", "started_child"],
    "cores": ["cgroup_cpu_quota", "usable_cores"],
    "memory": ["release_freed_memory", "thread_scratch"],
    "progress": ["progress_interval"],
    "threads": ["fan_out", "in_background", "quick_handoff"],
    "timing": ["StageTimer"],
})

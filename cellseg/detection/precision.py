"""Which arithmetic the network runs in: bf16 where the processor has it natively, fp32 elsewhere.

bf16 autocast halves the bytes a convolution moves and, on CPUs with bf16 instructions (AVX512_BF16 on AMD Zen 4/5,
AMX on Intel Sapphire Rapids and later), raises their rate: a training step and a count are faster with the same
results (docs/training.md, docs/performance.md). Without those instructions bf16 is emulated and
slower than fp32, so `auto` takes it only where it is native. CUDA GPUs (compute capability >= 8) have it natively.

Torch-free: the processor's flags come from /proc/cpuinfo.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CellsegError

PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags that mean native bf16 arithmetic (any one suffices)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Environment variables that cap the instruction sets torch's kernels use (oneDNN's convolutions, ATen's
# vectorised operators): set, they make a CPU run the code paths of an older one, e.g. a Zen 4 those of a Zen 3.
KERNEL_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
# ONEDNN_MAX_CPU_ISA values below avx512_core_bf16: oneDNN then has no bf16 instructions, whatever the CPU has
ONEDNN_ISAS_WITHOUT_BF16 = ("sse41", "avx", "avx2", "avx2_vnni", "avx512_core", "avx512_core_vnni")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's feature flags (empty where /proc/cpuinfo does not exist, e.g. macOS, Windows)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def kernel_isa_caps() -> dict[str, str]:
    """The instruction-set caps in force for torch's CPU kernels (KERNEL_ISA_VARIABLES that are set)."""
    return {name: os.environ[name] for name in KERNEL_ISA_VARIABLES if os.environ.get(name)}


def onednn_bf16_capped() -> bool:
    """Whether ONEDNN_MAX_CPU_ISA keeps oneDNN below its bf16 instructions."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().lower() in ONEDNN_ISAS_WITHOUT_BF16


def cpu_has_native_bf16() -> bool:
    """The CPU has bf16 instructions (NATIVE_BF16_FLAGS) and oneDNN may use them (onednn_bf16_capped)."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS) and not onednn_bf16_capped()


def resolve_precision(requested: str, device_type: str, cuda_bf16: bool = True) -> tuple[str, str]:
    """`requested` (auto | fp32 | bf16) on `device_type` ('cpu' or 'cuda') -> (precision, why), precision being
    'bf16' or 'fp32'. An explicit bf16 is honoured (slow where emulated: the reason says so)."""
    if requested not in PRECISIONS:
        raise CellsegError(f"expected a precision of {', '.join(PRECISIONS)}, found {requested!r}")
    if device_type == "cuda":
        if requested == "fp32":
            return "fp32", "fp32 as asked"
        if requested == "bf16" or cuda_bf16:
            return "bf16", "bf16 autocast on the GPU"
        return "fp32", "fp32: this GPU has no native bf16"
    native = cpu_has_native_bf16()
    if requested == "fp32":
        return "fp32", "fp32 as asked"
    if requested == "bf16":
        return "bf16", ("bf16 as asked (native on this CPU)" if native
                        else "bf16 as asked, emulated here (no avx512_bf16/amx_bf16 for oneDNN): slower than fp32")
    if native:
        return "bf16", "bf16 autocast: this CPU has native bf16 (avx512_bf16 or amx_bf16)"
    if onednn_bf16_capped():
        return "fp32", f"fp32: ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']} leaves oneDNN no bf16 instructions"
    return "fp32", "fp32: this CPU has no native bf16 (avx512_bf16 or amx_bf16)"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name (/proc/cpuinfo; platform.processor() elsewhere), with its x86 family and model
    numbers where the name alone does not tell the generation: a cloud "AMD EPYC" is Zen 3 (family 25 model 1),
    Zen 4 (25, 17) or Zen 5 (26, ...), whose speeds and bf16 support differ. Caps on torch's kernels
    (kernel_isa_caps) are named after it: a figure taken under them is not the processor's own."""
    caps = ", ".join(f"{name}={value}" for name, value in kernel_isa_caps().items())
    return processor_name(cpuinfo) + (f", kernels capped: {caps}" if caps else "")


def processor_name(cpuinfo: Path) -> str:
    """cpu_model's processor part: the model name, with the family and model numbers where /proc/cpuinfo has them."""
    import platform
    try:
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if not line.strip():
                break                       # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = (f" (family {fields['cpu family']} model {fields['model']})"
                       if "cpu family" in fields and "model" in fields else "")
            return fields["model name"] + numbers
    except OSError:
        pass
    return platform.processor() or "unknown"


def runtime_environment(device: str) -> dict:
    """What run.json records of the software and hardware a count ran on (a count's cells can differ in their last
    digits between torch versions, CPUs and GPUs): Python, torch, torchvision and numpy versions, the system, and the
    processor (CPU model and torch's threads, or the GPU's name)."""
    import platform

    import numpy
    import torch
    import torchvision
    environment = {"python": platform.python_version(), "torch": torch.__version__,
                   "torchvision": torchvision.__version__, "numpy": numpy.__version__,
                   "system": platform.platform(terse=True), "cpu": cpu_model()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        environment["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        environment["torch_threads"] = torch.get_num_threads()
    return environment

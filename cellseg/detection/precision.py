"""Which arithmetic the network runs in: bf16 where the processor has it natively, fp32 elsewhere.

bf16 autocast halves the bytes a convolution moves and, on CPUs with bf16 instructions (AVX512_BF16 on AMD Zen 4/5,
AMX on Intel Sapphire Rapids and later), raises their rate: a training step and a count are faster with the same
results (docs/training.md, docs/performance.md). Without those instructions bf16 is emulated and
slower than fp32, so `auto` takes it only where it is native. CUDA GPUs (compute capability >= 8) have it natively.

Torch-free: the processor's flags come from /proc/cpuinfo.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CellsegError

PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags that mean native bf16 arithmetic (any one suffices)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


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


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


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
                        else "bf16 as asked, emulated on this CPU (no avx512_bf16/amx_bf16): slower than fp32")
    if native:
        return "bf16", "bf16 autocast: this CPU has native bf16 (avx512_bf16 or amx_bf16)"
    return "fp32", "fp32: this CPU has no native bf16 (avx512_bf16 or amx_bf16)"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name (/proc/cpuinfo; platform.processor() elsewhere), with its x86 family and model
    numbers where the name alone does not tell the generation: a cloud "AMD EPYC" is Zen 3 (family 25 model 1),
    Zen 4 (25, 17) or Zen 5 (26, ...), whose speeds and bf16 support differ."""
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

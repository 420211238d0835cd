"""What the CPU running an artifact has, against what the artifact says it needs (manifest "requires").

Today one requirement exists: "vnni", for int8 weights at full range (int8.weight_range=full), which
ONNX Runtime's u8 x s8 kernels compute exactly only with VNNI's int32 dot products (effc.ops). Only
x86 CPUs can lack it: other architectures' kernels widen the products before adding them.
"""

from __future__ import annotations

import platform
from pathlib import Path

from effc.errors import EffcError

# requirement -> (CPU flags of which any one satisfies it, as /proc/cpuinfo names them; why it is needed)
REQUIREMENTS = {
    "vnni": (("avx512_vnni", "avx_vnni"),
             "its int8 weights use the full range (int8.weight_range=full), which ONNX Runtime's int8 kernels "
             "compute wrongly on x86 CPUs without VNNI; recompile without int8.weight_range=full (the default, "
             "pairs, is exact on every CPU)"),
}


NUMPY_NAMES = {"AVX512VNNI": "avx512_vnni", "AVX512F": "avx512f", "AVX2": "avx2"}  # numpy's -> /proc/cpuinfo's


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def flags() -> set[str]:
    """The CPU's feature flags, lower case as /proc/cpuinfo names them. From CPUID as numpy read it at
    import (what ONNX Runtime's kernel dispatch reads too); /proc/cpuinfo only adds what numpy does not
    name (avx_vnni), and only when it agrees with CPUID on AVX2 and AVX-512, since under an emulator or
    a masked VM it describes the host instead."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__

    have = {NUMPY_NAMES.get(k, k.lower()) for k, v in __cpu_features__.items() if v}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return have
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    listed = set(line.partition(":")[2].split())
    if listed and all((f in listed) == (f in have) for f in ("avx2", "avx512f")):
        have |= listed & {"avx_vnni"}
    return have


def check(root: Path, manifest: dict) -> None:
    """Refuse, in one line, an artifact whose CPU requirements this machine does not meet."""
    for need in manifest.get("requires", {}).get("cpu", []):
        if need not in REQUIREMENTS:
            raise EffcError(f"{root} needs a CPU feature this effc does not know ({need!r}); "
                            "open it with a newer effc or recompile it")
        any_of, why = REQUIREMENTS[need]
        if is_x86() and not flags() & set(any_of):
            raise EffcError(f"{root} needs a CPU with {need.upper()} ({' or '.join(any_of)}), which this one lacks: "
                            f"{why}")

"""effc's C++ operator library (compiler/csrc): built once per torch version and source, on first use,
with the system C++ compiler (torch.utils.cpp_extension), and cached. The `torch` target copies the
built library into the artifact, so the machine that runs it needs no compiler.

Ops (namespace effc_native):
  nf4_linear(...)       same arguments and result as effc::nf4_linear, without the float weight
  window_attention(...) same arguments and result as effc::window_attention, flash-style over the allowed keys
  nf4_kernel_isa(str)   which SIMD path the library's kernels run (nf4_linear and window_attention: one
                        setting); "" asks, "auto", "scalar", "avx2", "avx512" set it
  nf4_tables()          the NF4 and double-quant code tables compiled in (checked against effc.formats.nf4)
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from effc.errors import EffcError
from effc.runtime.torch_program import registered

SOURCES = [Path(__file__).parent / "csrc" / "nf4_linear.cpp", Path(__file__).parent / "csrc" / "window_attention.cpp"]
# The CPU kernels the library registers (one library, one TORCH_LIBRARY namespace): how load() tells
# whether a copy of it is already in the process.
KERNELS = ("effc_native::nf4_linear", "effc_native::window_attention")
# -ffp-contract=off: decoding a double-quantized absmax is a multiply then an add, rounded twice, as in
# bitsandbytes; the compiler must not fuse them. No -march: SIMD paths are picked at run time.
# -fopenmp: at::parallel_for is inline OpenMP in ATen's headers, so without it the kernels run on one
# thread. The library then needs libgomp.so.1, which is torch's own copy once torch is loaded (the same
# soname), so its threads are torch's: torch.set_num_threads applies.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _build_dir() -> Path:
    h = hashlib.sha256(torch.__version__.encode() + " ".join(CFLAGS + LDFLAGS).encode())
    for src in SOURCES:
        h.update(src.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "effc" / "native" / h.hexdigest()[:16]


def library_path(log=None) -> Path:
    """The built library (building it first if needed, ~20 s once)."""
    out = _build_dir()
    lib = out / "effc_native.so"
    if lib.is_file():
        return lib
    from torch.utils import cpp_extension

    out.mkdir(parents=True, exist_ok=True)
    (log or (lambda m: print(m, file=sys.stderr)))(f"effc: building the native kernels in {out} (once)...")
    try:
        built = cpp_extension.load(name="effc_native", sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                                   extra_ldflags=LDFLAGS, build_directory=str(out), is_python_module=False, verbose=False)
    except (RuntimeError, OSError) as e:
        raise EffcError(f"could not build effc's C++ kernels ({str(e).splitlines()[0]}); install a C++ compiler "
                        "(g++) and ninja, or use --target ort") from None
    return Path(built) if built else lib


_loaded: Path | None = None


def load(log=None) -> Path:
    """Load the library into this process (once) and register the fake (shape) implementations that
    torch.export and AOTInductor need. Returns the library's path."""
    global _loaded
    if _loaded is None:
        path = library_path(log)
        # Loading a second copy (e.g. an artifact's, opened first) would register the ops again and abort,
        # so a copy already here is used; one from an older build may lack some of the kernels.
        present = [op for op in KERNELS if registered(op)]
        if not present:
            torch.ops.load_library(str(path))
        elif len(present) < len(KERNELS):
            missing = ", ".join(op for op in KERNELS if op not in present)
            raise EffcError(f"this process already loaded an older copy of effc's C++ kernels (an artifact's?) "
                            f"without {missing}; compile in a fresh process, before opening that artifact")
        for kernel, fake in native_fakes().items():
            torch.library.register_fake(kernel)(fake)
        _loaded = path
    return _loaded


def native_fakes() -> dict:
    """Native kernel name -> the fake of the effc op it stands in for (the same schema, so the same shapes)."""
    from effc.ops.registry import OPS

    return {op.translations["torch"]: op.fake for op in OPS.values()
            if isinstance(op.translations.get("torch"), str) and op.translations["torch"].startswith("effc_native::")}

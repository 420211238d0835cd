"""effc's C++ operator library (compiler/csrc): built once per torch version and source, on first use,
with the system C++ compiler (torch.utils.cpp_extension), and cached. The `torch` target copies the
built library into the artifact, so the machine that runs it needs no compiler.

Ops (namespace effc_native):
  nf4_linear(...)       same arguments and result as effc::nf4_linear, without the float weight
  nf4_kernel_isa(str)   which SIMD path runs ("" asks; "auto", "scalar", "avx2", "avx512" set it)
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

SOURCES = [Path(__file__).parent / "csrc" / "nf4_linear.cpp"]
# -ffp-contract=off: decoding a double-quantized absmax is a multiply then an add, rounded twice, as in
# bitsandbytes; the compiler must not fuse them. No -march: SIMD paths are picked at run time.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]


def _build_dir() -> Path:
    h = hashlib.sha256(torch.__version__.encode() + " ".join(CFLAGS).encode())
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
                                   build_directory=str(out), is_python_module=False, verbose=False)
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
        # Loading a second copy (e.g. an artifact's, opened first) would register the ops again and abort.
        if not registered("effc_native::nf4_linear"):
            torch.ops.load_library(str(path))
        for kernel, fake in native_fakes().items():
            torch.library.register_fake(kernel)(fake)
        _loaded = path
    return _loaded


def native_fakes() -> dict:
    """Native kernel name -> the fake of the effc op it stands in for (the same schema, so the same shapes)."""
    from effc.ops.registry import OPS

    return {op.translations["torch"]: op.fake for op in OPS.values()
            if isinstance(op.translations.get("torch"), str) and op.translations["torch"].startswith("effc_native::")}

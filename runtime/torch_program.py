"""The runner for `torch` target artifacts (.pt2): effc's op library, then the AOTInductor package (or
the saved ExportedProgram). Only this module of the runtime imports torch, and only when such an
artifact is opened (runtime/backends.py)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from effc.errors import EffcError
from effc.runtime.manifest import artifact_file, sha256_file


def checked(root: Path, manifest: dict, field: str, rel: str) -> Path:
    """root/rel after its sha256 matched the manifest's, checked right before it is loaded: the op
    library and an AOTInductor package are native code, so this holds even for a Session opened with
    verify_hashes=False."""
    path = artifact_file(root, manifest, rel, field)
    if sha256_file(path) != manifest["files"][rel]:
        raise EffcError(f"artifact {root} was tampered with: sha256 of {rel} does not match manifest.json; "
                        "not loading it, recompile the artifact")
    return path


class TorchProgram:
    taps: ClassVar[bool] = False  # an AOTInductor package computes its outputs only

    def __init__(self, root: Path, manifest: dict, threads: int | None = None, providers: list[str] | None = None,
                 taps: list[str] | tuple[str, ...] = (), verified: bool = False):
        """`verified`: every file's hash was checked when the manifest was read (the op library is hashed
        again anyway, right before it is loaded). `providers` are ONNX Runtime's; torch runs on the CPU."""
        import torch

        self.providers: list[str] = []
        info = manifest["target"]
        if info["torch"] != torch.__version__:
            # The op library and the AOTInductor package are built against one torch ABI.
            raise EffcError(f"{root} was built with torch {info['torch']}, this process has {torch.__version__}; "
                            f"install torch=={info['torch']} or recompile the artifact")
        # Inductor compiled its kernels with the build machine's vector ISA; on a CPU without it they
        # would die on an illegal instruction, so refuse instead.
        built_for = info.get("inductor_isa", "").split()[:1]
        have = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2", "default", ...
        if built_for and built_for[0].startswith("avx") and not _at_least(have, built_for[0]):
            raise EffcError(f"{root} was compiled for {built_for[0].upper()} CPUs and this CPU has {have.upper()}; "
                            "recompile it with `effc compile --target torch` on a machine like this one")
        # A second copy of the library would register its ops again, which aborts the process.
        if info.get("native_library") and not registered("effc_native::nf4_linear"):
            torch.ops.load_library(str(checked(root, manifest, "target.native_library", info["native_library"])))
        if threads:
            torch.set_num_threads(threads)
        model = str(checked(root, manifest, "model_file", manifest["model_file"]) if not verified
                    else artifact_file(root, manifest, manifest["model_file"], "model_file"))
        try:
            if info["format"] == "aoti":
                self._call = torch._inductor.aoti_load_package(model)
            else:
                self._call = torch.export.load(model).module()
        except Exception as e:  # torch raises many types here
            raise EffcError(f"torch could not load {model}: {str(e).strip().splitlines()[0]}") from None
        self._torch = torch
        self._inputs = [i["name"] for i in manifest["inputs"]]
        self._outputs = [o["name"] for o in manifest["outputs"]]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            outs = self._call(**{n: torch.as_tensor(np.ascontiguousarray(feeds[n])) for n in self._inputs})
        values = dict(zip(self._outputs, outs))
        return [values[n].numpy() for n in names]


def registered(op: str) -> bool:
    """Whether this process already has a CPU kernel for `op` (e.g. "effc_native::nf4_linear")."""
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    except RuntimeError:  # no such operator
        return False


_ISA_ORDER = ("default", "avx2", "avx512")


def _at_least(have: str, need: str) -> bool:
    rank = {isa: i for i, isa in enumerate(_ISA_ORDER)}
    return rank.get(have, 0) >= rank.get(need, len(_ISA_ORDER))

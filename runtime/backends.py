"""The runners that execute artifacts, keyed by the manifest's `runner` field (written at compile time
from the target's BuildResult.runner). A runner is imported only when an artifact that names it is
opened, so an ONNX artifact never imports torch.

A runner class is built as cls(root, manifest, threads=, providers=, taps=, verified=) and has
`run(names, feeds) -> list of arrays` and `taps: ClassVar[bool]`, whether it can return intermediate
values (the layer-wise debugger's taps) as extra outputs. A runner may have a static
`verification_providers()`: the providers effc.compile verifies its artifacts with."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from effc.errors import EffcError


@dataclass(frozen=True)
class Backend:
    runner: str  # "module:Class"
    library: str  # what the runner imports; missing, the artifact cannot run here
    install: str  # the install hint, formatted with the manifest's target entry as `target`


BACKENDS = {
    "onnxruntime": Backend("effc.runtime.onnxruntime_runner:OrtRunner", "onnxruntime", "pip install onnxruntime"),
    "torch": Backend("effc.runtime.torch_program:TorchProgram", "torch", "pip install torch=={target[torch]}"),
    # A TensorRT engine where tensorrt and a matching GPU are present, else model.onnx in ONNX Runtime
    # (plugins through their reference functions): onnxruntime is what it needs everywhere.
    "tensorrt": Backend("effc.runtime.tensorrt_runner:TensorRTRunner", "onnxruntime",
                        "pip install onnxruntime (on a GPU host: pip install 'effc[gpu]')"),
}


def runner_class(root: Path, manifest: dict) -> type:
    """The class of the runner the manifest names, after checking that its library imports."""
    name = manifest.get("runner")
    if name is None:
        raise EffcError(f"{root} names no runner in its manifest (built by an older effc); recompile it with this effc")
    backend = BACKENDS.get(name)
    if backend is None:
        raise EffcError(f"{root} runs on {name!r}, which this effc has no runner for (it has {', '.join(BACKENDS)}); "
                        "recompile it with this effc")
    try:
        importlib.import_module(backend.library)
    except ImportError:
        hint = backend.install.format(target=manifest.get("target") or {})
        raise EffcError(f"{root} runs on {backend.library}, which is not installed here: {hint}") from None
    module, _, cls = backend.runner.partition(":")
    return getattr(importlib.import_module(module), cls)

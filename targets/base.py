"""The target interface and the one table of targets."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from effc.errors import EffcError

if TYPE_CHECKING:  # the table of targets is read before torch is imported (effc.preflight)
    import torch


@dataclass
class BuildResult:
    model_file: str  # relative to the artifact directory
    files: list[str]
    info: dict = field(default_factory=dict)  # opset, providers, optimization level...
    probes: dict = field(default_factory=dict)  # layer -> ONNX values at its input/output (effc debug)
    inputs: list[dict] = field(default_factory=list)  # user inputs: name, dtype (numpy), shape (dim names)
    outputs: list[dict] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)  # operator -> count in the artifact's graph
    runner: str = "onnxruntime"  # what runs the artifact: a key of effc.runtime.backends.BACKENDS


class Target:
    name: ClassVar[str]
    summary: ClassVar[str]
    column: ClassVar[str]  # which translation of each effc op it takes (effc.ops.registry)
    # Why a causal LM is built without its KV cache here (one forward), or None: it takes the cache.
    no_kv_cache: ClassVar[str | None] = None

    def available(self) -> str | None:
        """None when this target can build here, else the reason it cannot."""
        return None

    def translations(self) -> dict:
        """effc custom op -> this target's translation (the op registry's `column`)."""
        from effc.ops import registry

        return registry.translations(self.column)

    def prepare(self, source, shape_ranges: dict[str, list[tuple[int, int, int]]] | None = None) -> None:
        """Called with the loaded source (effc.sources) and the --input-shapes ranges (input -> one
        (min, opt, max) per dim) before build, for targets whose build configuration depends on them."""

    def build(self, program: torch.export.ExportedProgram, inputs: dict[str, torch.Tensor],
              output_names: list[str], dynamic: dict[str, dict[int, str]], out_dir: Path,
              overridable: frozenset[str] = frozenset()) -> BuildResult:
        raise NotImplementedError


def layers(program: torch.export.ExportedProgram) -> dict[str, str | None]:
    """The program's layers (modules running a linear, an embedding or an effc op) in graph order, each
    with the fx node of its input."""
    from effc.layerwise import probes

    return {name: p["input"] for name, p in probes(program.graph_module).items()}


TARGETS: dict[str, str] = {
    "onnx": "effc.targets.onnx:OnnxTarget",
    "ort": "effc.targets.ort:OrtTarget",
    "torch": "effc.targets.pt2:TorchTarget",
    "trt": "effc.targets.trt:TrtTarget",
}

# Pass settings a target implies, applied before the user's --pass-config (which wins). Data, not a
# Target attribute, so that preflight reads it without importing the target (and torch).
PASS_DEFAULTS: dict[str, dict[str, dict[str, str]]] = {
    # TensorRT takes int8 as explicit Q/DQ with calibrated per-tensor activation scales (static W8A8).
    # A 4-bit gather (a tied embedding sharing the LM head's table) has no TensorRT form: no uint8 Gather,
    # no bitwise ops.
    "trt": {"int8": {"mode": "static"}, "int4": {"tied_embedding": "false"}},
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise EffcError(f"unknown target {name!r}; targets: {', '.join(sorted(TARGETS))}")
    module, _, attr = TARGETS[name].partition(":")
    target = getattr(importlib.import_module(module), attr)()
    reason = target.available()
    if reason:
        raise EffcError(f"target {name} cannot build on this machine: {reason}")
    return target

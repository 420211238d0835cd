"""The table of effc's custom ops: each op's overload, its fake (shape) function and its translation for
each target column. A target reads its column (Target.column); an op without an entry there is refused
before export (check_target).

Columns: "onnx" (an onnxscript function over standard ops), "ort" (onnxscript, com.microsoft contrib ops
allowed), "torch" (the name of a kernel in effc's C++ library with the op's schema, e.g.
"effc_native::nf4_linear", or a callable that decomposes the op into aten ops, for
ExportedProgram.run_decompositions), "trt" (onnxscript over the ops TensorRT's ONNX parser supports,
or an effc TensorRT plugin node, targets/trt_plugins.py). A new target adds its column to the ops it can run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from effc.errors import EffcError

if TYPE_CHECKING:
    import torch

# The target columns known today, only to order the error message's list (an op may name any column).
KNOWN_COLUMNS = ("onnx", "ort", "torch", "trt")


@dataclass(frozen=True)
class Op:
    overload: torch._ops.OpOverload  # torch.ops.effc.<name>.default
    translations: Mapping[str, Any]  # column -> translation
    fake: Callable | None = None  # shape function; native.load registers it for the op's native twin too

    @property
    def name(self) -> str:
        return str(self.overload.name())  # "effc::<name>"


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    OPS[op.name] = op
    return op


def translations(column: str) -> dict:
    """{overload: translation} of every registered op that has one for `column`."""
    import effc.ops  # noqa: F401  (registers every op)

    return {op.overload: op.translations[column] for op in OPS.values() if column in op.translations}


def ops_of(program: torch.export.ExportedProgram) -> set[str]:
    """The effc ops ("effc::<name>") the program calls."""
    import torch

    return {str(n.target.name()) for n in program.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "effc"}


def check_target(program: torch.export.ExportedProgram, target) -> None:
    """Raise EffcError (one line) for the first effc op in `program` without a translation for the target's column."""
    import effc.ops  # noqa: F401

    for name in sorted(ops_of(program)):
        op = OPS.get(name)
        columns = set(op.translations) if op else set()
        have = [c for c in KNOWN_COLUMNS if c in columns] + sorted(columns - set(KNOWN_COLUMNS))
        if target.column in have:
            continue
        if not have:
            raise EffcError(f"{name} is not registered in effc.ops.registry, so no target can run it; register it "
                            "with translations, or drop the pass that introduced it")
        raise EffcError(f"{name} has no translation for target {target.name}; targets that have it: {', '.join(have)} "
                        f"(use --target {' or '.join(have)}, or drop the pass that introduced it)")

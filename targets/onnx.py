"""onnx: portable ONNX, standard opset only, runs in any ONNX runtime."""

from __future__ import annotations

from pathlib import Path

from effc.errors import EffcError
from effc.targets import blocked_dq, onnx_export
from effc.targets.base import BuildResult, Target
from effc.targets.onnx_nodes import STANDARD_DOMAINS, standard_opset



class OnnxTarget(Target):
    name = "onnx"
    summary = "portable ONNX (standard opset only)"
    column = "onnx"

    def build(self, program, inputs, output_names, dynamic, out_dir: Path,
              overridable: frozenset[str] = frozenset()) -> BuildResult:
        model = onnx_export.export(program, inputs, output_names, dynamic, self.translations(),
                                   overridable=overridable)
        blocked_dq.to_standard(model)
        custom = sorted({n.domain for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
        if custom:
            raise EffcError(f"the graph uses operators outside the standard ONNX opset ({', '.join(custom)}); "
                            "use --target ort, or drop the pass that introduced them")
        files = onnx_export.save(model, out_dir / "model.onnx")
        return onnx_export.result(out_dir, files, {"opset": standard_opset(model)}, model, program)

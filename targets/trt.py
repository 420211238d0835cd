"""trt: a TensorRT-ready artifact. model.onnx holds only what TensorRT 10's ONNX parser takes (checked node
by node by targets/trt_support.py), with explicit symmetric Q/DQ quantization and effc's plugin nodes
(targets/trt_plugins.py, each with a reference ONNX function so ONNX Runtime runs the same file);
trt_build.json holds the engine's build configuration (targets/trt_config.py). The engine itself is built
on the GPU host (`effc build-engine`, targets/trt_engine.py). docs/TENSORRT.md says what is emitted and why."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from effc.errors import EffcError
from effc.targets import blocked_dq, onnx_export, trt_config, trt_plugins, trt_support
from effc.targets.base import BuildResult, Target
from effc.targets.onnx_nodes import standard_opset

OPSET = 20  # the parser's newest; blocked_dq.to_standard raises it to 21 for INT4 blocked DequantizeLinear


def _refuse_unexplicit(program) -> None:
    """Quantized forms TensorRT's explicit quantization cannot express, refused before export in one line."""
    import torch

    import effc.ops  # noqa: F401  (registers torch.ops.effc.*, read below)

    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.effc.nbits_linear.default:
            continue
        zero_points, int8_activations = node.args[3], node.args[8]
        if zero_points is not None:
            raise EffcError("int4 with zero points is not TensorRT-ready (TensorRT's DequantizeLinear needs zero "
                            "point 0): use --pass-config int4.symmetric=true")
        if int8_activations:
            raise EffcError("int4 with int8_activations quantizes activations at run time, which is not TensorRT's "
                            "explicit quantization: drop int4.int8_activations (TensorRT picks its own kernels)")


class TrtTarget(Target):
    """Translations: the registry's "trt" column only (Target.translations). Attention stays the exporter's
    standard MatMul/Softmax decomposition with float masks (no com.microsoft MultiHeadAttention, which the
    ort target adds): TensorRT recognizes and fuses it itself."""

    name = "trt"
    summary = "TensorRT: parser-ready ONNX (explicit Q/DQ, effc plugins) + engine build configuration"
    column = "trt"
    no_kv_cache = "the engine configuration has one optimization profile and no KV-cache profile yet"

    def __init__(self) -> None:
        self.config = None
        self.shape_ranges = None

    def prepare(self, source, shape_ranges=None) -> None:
        # the optimization profiles' defaults come from the model config (max positions) or --input-shapes
        self.config = getattr(source, "config", None)
        self.shape_ranges = shape_ranges

    def build(self, program, inputs, output_names, dynamic, out_dir: Path,
              overridable: frozenset[str] = frozenset()) -> BuildResult:
        _refuse_unexplicit(program)
        model = onnx_export.export(program, inputs, output_names, dynamic, self.translations(), opset=OPSET,
                                   overridable=overridable)
        blocked_dq.to_standard(model)
        trt_plugins.finalize(model)
        found = trt_support.problems(model)
        if found:
            raise EffcError(trt_support.summary(found))
        used = Counter(p.name for p in map(trt_plugins.plugin_of, model.graph.node) if p)
        files = onnx_export.save(model, out_dir / "model.onnx")
        info = {"opset": standard_opset(model), "plugins": dict(sorted(used.items())), "build": trt_config.FILE,
                "tensorrt_ready": True}
        result = onnx_export.result(out_dir, files, info, model, program)
        example = {name: tuple(t.shape) for name, t in inputs.items()}
        config = trt_config.build_config(result.inputs, example, self.shape_ranges, self.config, plugins=used)
        result.files.append(trt_config.write(out_dir, config))
        result.runner = "tensorrt"
        return result

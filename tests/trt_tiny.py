"""A tiny trt artifact made by hand (no torch, no export): one dynamic-batch input through MatMul, Add and
Relu, the manifest fields the TensorRT runner and the engine builder read, and a trt_build.json from
effc.targets.trt_config. Small enough to build an engine from in seconds on a TensorRT host."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from effc.runtime.manifest import write_manifest
from effc.targets import trt_config

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)
INPUTS = [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
OUTPUTS = [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}]


def reference(x: np.ndarray) -> np.ndarray:
    """What the graph computes, in numpy (the independent reference)."""
    return np.maximum(x @ W + B, 0)


def model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
         helper.make_node("Add", ["xw", "B"], ["pre"], name="add"),
         helper.make_node("Relu", ["pre"], ["y"], name="relu")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def make(root: Path, runner: str = "tensorrt", sign_key: bytes | None = None,
         shape_ranges: dict | None = None) -> Path:
    """Write the artifact into `root` (created) and return it."""
    root.mkdir(parents=True)
    onnx.save(model(), str(root / "model.onnx"))
    manifest = {"effc_version": "test", "source": {"spec": "tests/trt_tiny.py", "kind": "onnx"}, "passes": [],
                "target": {"name": "trt" if runner == "tensorrt" else "onnx"}, "runner": runner,
                "model_file": "model.onnx", "inputs": INPUTS, "outputs": OUTPUTS}
    if runner == "tensorrt":
        trt_config.write(root, trt_config.build_config(INPUTS, {"x": (2, 4)}, shape_ranges, None))
    write_manifest(root, manifest, sign_key)
    return root

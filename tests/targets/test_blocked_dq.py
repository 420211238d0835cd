"""blocked_dq.to_standard: the placeholder over MatMulNBits-layout codes becomes standard opset-21
DequantizeLinear (INT4/UINT4, INT8/UINT8, block_size along K) + MatMul; ONNX Runtime's result equals
x @ effc.formats.nbits.dequantize(...)^T, for symmetric and asymmetric codes, odd block counts and padded K."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from effc.formats.nbits import dequantize, pack, rtn
from effc.targets import blocked_dq


def _model(inits: dict, k: int, block: int, bits: int) -> onnx.ModelProto:
    names = ["packed", "scales"] + (["zero"] if "zero" in inits else [])
    nodes = [helper.make_node("BlockedWeight", names, ["w"], domain=blocked_dq.DOMAIN, K=k, block=block, bits=bits),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", None])],
                              [numpy_helper.from_array(v, n) for n, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(blocked_dq.DOMAIN, 1)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    # ORT fuses DequantizeLinear -> MatMul into MatMulNBits; level 0 keeps float activations, as effc's runtime.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, block", [(96, 32), (128, 64), (100, 32)])  # 3 blocks (odd); 2; K padded to 128
def test_int4_matches_the_reference_dequantization(symmetric, k, block):
    torch.manual_seed(k + block)
    n = 24
    w, x = torch.randn(n, k), torch.randn(5, k)
    codes, scales, zeros = rtn(w, block, symmetric)
    packed, zero_points = pack(codes, zeros, block, symmetric)
    inits = {"packed": packed.numpy(), "scales": scales.numpy()}
    if zero_points is not None:
        inits["zero"] = zero_points.numpy()
    model = _model(inits, k, block, 4)
    assert blocked_dq.to_standard(model) == 1
    onnx.checker.check_model(model, full_check=True)
    types = {t.data_type for t in model.graph.initializer}
    assert (TensorProto.INT4 if symmetric else TensorProto.UINT4) in types
    assert [n.op_type for n in model.graph.node][0] == "DequantizeLinear"
    assert next(i.version for i in model.opset_import if i.domain == "") == 21
    got = _run(model, x.numpy())
    want = x @ dequantize(packed, scales, zero_points, k, block).t()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_int8_blocks_match_the_reference_dequantization():
    """bits=8 (nf4.kernel=int8_blocks on the onnx target): INT8 codes, zero point 0 after the shift."""
    rng = np.random.default_rng(0)
    n, k, block = 16, 128, 64
    packed = rng.integers(0, 256, (n, k // block, block), dtype=np.uint8)
    scales = rng.random((n, k // block), dtype=np.float32)
    model = _model({"packed": packed, "scales": scales}, k, block, 8)
    assert blocked_dq.to_standard(model) == 1
    assert TensorProto.INT8 in {t.data_type for t in model.graph.initializer}
    x = rng.standard_normal((3, k), dtype=np.float32)
    got = _run(model, x)
    want = x @ dequantize(torch.from_numpy(packed), torch.from_numpy(scales), None, k, block, 8).t().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

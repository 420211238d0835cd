"""Block-quantized weights (effc::nbits_linear: int4/int8 codes in blocks along K) for the portable
`onnx` target as the standard opset-21 form: an INT4/UINT4 (or INT8/UINT8) weight initializer
[K, N] and DequantizeLinear(axis=0, block_size) feeding MatMul, which any ONNX runtime reads, which
TensorRT takes as explicit quantization, and which ONNX Runtime fuses into MatMulNBits.

The exporter cannot make INT4 initializers, and its constant folding would turn small dequantized
weights into float ones, so the translation emits an opaque placeholder node (domain effc.internal)
over the MatMulNBits-layout tensors, and `to_standard` replaces each placeholder after export with
the repacked initializers and the DequantizeLinear.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.defs import OpSchema
from onnxscript.values import Opset

from effc.formats.nbits import pack_nibbles, unpack
from effc.targets.onnx_nodes import STANDARD_DOMAINS, replace_nodes

DOMAIN = "effc.internal"
OPSET = 21  # DequantizeLinear's block_size and the 4-bit types

onnx.defs.register_schema(OpSchema(
    "BlockedWeight", DOMAIN, 1,
    inputs=[OpSchema.FormalParameter("packed", "tensor(uint8)"), OpSchema.FormalParameter("scales", "tensor(float)"),
            OpSchema.FormalParameter("zero_points", "tensor(uint8)",
                                     param_option=OpSchema.FormalParameterOption.Optional)],
    outputs=[OpSchema.FormalParameter("weight", "tensor(float)")],
    attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT) for a in ("K", "block", "bits")]))
effc_internal = Opset(DOMAIN, 1)


def _codes(packed: np.ndarray, n: int, width: int, bits: int) -> np.ndarray:
    return unpack(torch.from_numpy(packed), n, width, bits).numpy()


def _tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> TensorProto:
    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)
    t = TensorProto(name=name, data_type=TensorProto.INT4 if signed else TensorProto.UINT4, dims=values.shape)
    t.raw_data = pack_nibbles(torch.from_numpy(values.reshape(-1))).numpy().tobytes()  # flat, as ONNX packs 4 bits
    return t


def to_standard(model: onnx.ModelProto) -> int:
    """Replace every effc.internal BlockedWeight with initializers + DequantizeLinear (+ Slice when K was
    padded to whole blocks). Returns how many; raises the model's opset to 21 when there were any."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, block, bits = attrs["K"], attrs["block"], attrs["bits"]
        scales = numpy_helper.to_array(inits[node.input[1]])
        n, groups = scales.shape
        codes = _codes(numpy_helper.to_array(inits[node.input[0]]), n, groups * block, bits).T  # [K_padded, N]
        base = node.output[0]
        new_inits = [numpy_helper.from_array(np.ascontiguousarray(scales.T), f"{base}_scale")]
        if len(node.input) > 2 and node.input[2]:  # asymmetric: unsigned codes and zero points
            zero = _codes(numpy_helper.to_array(inits[node.input[2]]), n, groups, bits).T
            new_inits += [_tensor(f"{base}_q", codes, bits, False), _tensor(f"{base}_zero", zero, bits, False)]
        else:  # symmetric: the code minus 2^(bits-1), signed, zero point 0
            new_inits.insert(0, _tensor(f"{base}_q", codes.astype(np.int16) - (1 << (bits - 1)), bits, True))
        inputs = [f"{base}_q", f"{base}_scale"] + ([f"{base}_zero"] if len(new_inits) == 3 else [])
        padded = groups * block != k
        nodes.append(helper.make_node("DequantizeLinear", inputs, [f"{base}_padded" if padded else base],
                                      name=f"{node.name}_dq", axis=0, block_size=block))
        if padded:
            new_inits += [numpy_helper.from_array(np.array(v, np.int64), f"{base}_{s}")
                          for s, v in (("start", [0]), ("end", [k]), ("axis", [0]))]
            nodes.append(helper.make_node("Slice", [f"{base}_padded", f"{base}_start", f"{base}_end", f"{base}_axis"],
                                          [base], name=f"{node.name}_slice"))
        model.graph.initializer.extend(new_inits)
        count += 1
    if count:
        replace_nodes(model, nodes)
        for imp in model.opset_import:
            if imp.domain in STANDARD_DOMAINS:
                imp.version = max(imp.version, OPSET)
        others = [imp for imp in model.opset_import if imp.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(others)
    return count

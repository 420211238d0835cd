"""Schemas of the ONNX Runtime contrib operators effc emits, registered with onnx so onnxscript (and the
torch ONNX exporter's translation functions) can build them. From ONNX Runtime's ContribOperators spec."""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema
from onnxscript.values import Opset

DOMAIN = "com.microsoft"
_FP = OpSchema.FormalParameter
_OPTIONAL = OpSchema.FormalParameterOption.Optional
_ATTR = OpSchema.Attribute
_INT = OpSchema.AttrType.INT
_HALF_AND_FULL = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]


def _register() -> None:
    schemas = [
        OpSchema("DynamicQuantizeMatMul", DOMAIN, 1,
                 inputs=[_FP("A", "T1"), _FP("B", "T2"), _FP("b_scale", "T1"),
                         _FP("b_zero_point", "T2", param_option=_OPTIONAL), _FP("bias", "T1", param_option=_OPTIONAL)],
                 outputs=[_FP("Y", "T1")],
                 type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(int8)", "tensor(uint8)"], "")]),
        OpSchema("MatMulIntegerToFloat", DOMAIN, 1,
                 inputs=[_FP("A", "T1"), _FP("B", "T2"), _FP("a_scale", "T3"), _FP("b_scale", "T3"),
                         _FP("a_zero_point", "T1", param_option=_OPTIONAL),
                         _FP("b_zero_point", "T2", param_option=_OPTIONAL), _FP("bias", "T3", param_option=_OPTIONAL)],
                 outputs=[_FP("Y", "T3")],
                 type_constraints=[("T1", ["tensor(int8)", "tensor(uint8)"], ""),
                                   ("T2", ["tensor(int8)", "tensor(uint8)"], ""), ("T3", ["tensor(float)"], "")]),
        OpSchema("MatMulNBits", DOMAIN, 1,
                 inputs=[_FP("A", "T1"), _FP("B", "T2"), _FP("scales", "T1"),
                         _FP("zero_points", "T3", param_option=_OPTIONAL),
                         _FP("g_idx", "T4", param_option=_OPTIONAL), _FP("bias", "T1", param_option=_OPTIONAL)],
                 outputs=[_FP("Y", "T1")],
                 type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                                   ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                                   ("T4", ["tensor(int32)"], "")],
                 attributes=[_ATTR(a, _INT, "") for a in ("K", "N", "bits", "block_size")]
                 + [_ATTR("accuracy_level", onnx.helper.make_attribute("accuracy_level", 0), "")]),
        OpSchema("GatherBlockQuantized", DOMAIN, 1,
                 inputs=[_FP("data", "T1"), _FP("indices", "Tind"), _FP("scales", "T2"),
                         _FP("zero_points", "T1", param_option=_OPTIONAL)],
                 outputs=[_FP("output", "T2")],
                 type_constraints=[("T1", ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"], ""),
                                   ("T2", ["tensor(float)", "tensor(float16)"], ""),
                                   ("Tind", ["tensor(int32)", "tensor(int64)"], "")],
                 attributes=[_ATTR(a, _INT, "") for a in ("bits", "block_size", "gather_axis", "quantize_axis")]),
        OpSchema("RotaryEmbedding", DOMAIN, 1,
                 inputs=[_FP("input", "T"), _FP("position_ids", "M"), _FP("cos_cache", "T"), _FP("sin_cache", "T")],
                 outputs=[_FP("output", "T")],
                 type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                                   ("M", ["tensor(int64)"], "")],
                 attributes=[_ATTR(name, onnx.helper.make_attribute(name, default), "")
                             for name, default in (("interleaved", 0), ("num_heads", 0), ("rotary_embedding_dim", 0),
                                                   ("is_packed_batching", 0), ("scale", 1.0))]),
        # ONNX Runtime registers this one in the ONNX domain (version 1), not com.microsoft; onnx has no schema.
        OpSchema("SimplifiedLayerNormalization", "", 1,
                 inputs=[_FP("X", "T"), _FP("scale", "V")],
                 outputs=[_FP("Y", "V"), _FP("inv_std_var", "U", param_option=_OPTIONAL)],
                 type_constraints=[("T", _HALF_AND_FULL, ""), ("U", ["tensor(float)", "tensor(double)"], ""),
                                   ("V", _HALF_AND_FULL, "")],
                 attributes=[_ATTR(name, onnx.helper.make_attribute(name, default), "")
                             for name, default in (("axis", -1), ("epsilon", 1e-5), ("stash_type", 1))]),
        OpSchema("MatMulBnb4", DOMAIN, 1,
                 inputs=[_FP("A", "T1"), _FP("B", "T2"), _FP("absmax", "T1")], outputs=[_FP("Y", "T1")],
                 type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], "")],
                 attributes=[_ATTR(a, _INT, "") for a in ("K", "N", "block_size", "quant_type")]),
        OpSchema("MultiHeadAttention", DOMAIN, 1,  # inputs up to attention_bias; ORT's later ones unused
                 inputs=[_FP("query", "T"), _FP("key", "T", param_option=_OPTIONAL),
                         _FP("value", "T", param_option=_OPTIONAL), _FP("bias", "T", param_option=_OPTIONAL),
                         _FP("key_padding_mask", "M", param_option=_OPTIONAL),
                         _FP("attention_bias", "T", param_option=_OPTIONAL)],
                 outputs=[_FP("output", "T")],
                 type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
                 attributes=[_ATTR("num_heads", _INT, "", required=True),
                             _ATTR("scale", OpSchema.AttrType.FLOAT, "", required=False),
                             _ATTR("mask_filter_value", OpSchema.AttrType.FLOAT, "", required=False),
                             _ATTR("unidirectional", _INT, "", required=False)]),
        OpSchema("GroupQueryAttention", DOMAIN, 1,  # inputs up to attention_bias; head_sink unused
                 inputs=[_FP("query", "T"), _FP("key", "T", param_option=_OPTIONAL),
                         _FP("value", "T", param_option=_OPTIONAL), _FP("past_key", "T", param_option=_OPTIONAL),
                         _FP("past_value", "T", param_option=_OPTIONAL), _FP("seqlens_k", "M"),
                         _FP("total_sequence_length", "M"), _FP("cos_cache", "T", param_option=_OPTIONAL),
                         _FP("sin_cache", "T", param_option=_OPTIONAL),
                         _FP("position_ids", "P", param_option=_OPTIONAL),
                         _FP("attention_bias", "T", param_option=_OPTIONAL)],
                 outputs=[_FP("output", "T"), _FP("present_key", "T"), _FP("present_value", "T")],
                 type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                                   ("P", ["tensor(int64)"], "")],
                 attributes=[_ATTR("num_heads", _INT, "", required=True),
                             _ATTR("kv_num_heads", _INT, "", required=True),
                             _ATTR("scale", OpSchema.AttrType.FLOAT, "", required=False),
                             _ATTR("local_window_size", _INT, "", required=False),
                             _ATTR("do_rotary", _INT, "", required=False)]),
    ]
    for schema in schemas:
        try:
            onnx.defs.get_schema(schema.name, schema.since_version, schema.domain)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)


_register()
msft = Opset(DOMAIN, 1)

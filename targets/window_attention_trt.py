"""effc::window_attention for --target trt (the registry's "trt" column): the band as effc's TensorRT plugin
band_attention (targets/trt_plugins.py, kernel targets/triton_window_attention.py). This emits the placeholder
that trt_plugins.finalize() turns into the plugin node and its reference function; the plugin's inputs are
fixed in number and type:
  - the query multiplied by the op's scale (a standard Mul in the query's type): the plugin takes scale 1,
    since the placeholder and tensorrt.plugin's SymInt32 scalars carry integers only;
  - key and value as they are;
  - key_valid as int32 [B, T] (nonzero -> 1, as the op reads it; [1, T] expanded), all ones when the op has
    none: one row and one kernel signature for both (reading B*T int32 is nothing beside the attention).
Global tokens and a block-sparse layout are not in the kernel: the placeholder carries their presence
(placeholder-only attributes global_tokens = their count, layout = 0/1), and finalize() refuses the node in one
line naming --target onnx or ort (which run every pattern; so does --target torch). The refusal is there and not
here because an EffcError raised inside a translation reaches the user wrapped in the exporter's
ConversionError, without its reason."""

from __future__ import annotations

import onnx
from onnxscript import opset20 as op

from effc.targets.trt_plugins import BAND, placeholder_opset

_pending = placeholder_opset()


def band_plugin(query, key, value, key_valid, window: int, causal: bool, dilation: int, global_tokens, block: int,
                layout, scale: float):
    """The band_attention placeholder over q*scale [B, N, S, D], k [B, KV, T, D], v [B, KV, T, Dv] and the
    int32 key_valid [B, T]; -> [B, N, S, Dv] in the query's type."""
    heads, kv_heads, head, v_head = (int(query.shape[1]), int(key.shape[1]), int(query.shape[3]),
                                     int(value.shape[3]))
    q = op.Mul(query, op.CastLike(op.Constant(value_float=float(scale)), query))
    batch_by_keys = op.Concat(op.Shape(query, start=0, end=1), op.Shape(key, start=2, end=3), axis=0)
    if key_valid is None:
        ones = op.Constant(value=onnx.helper.make_tensor("ones", onnx.TensorProto.INT32, [], [1]))
        valid = op.Expand(ones, batch_by_keys)
    else:
        as_bool = op.Cast(key_valid, to=onnx.TensorProto.BOOL)  # nonzero = attend, as the op's .to(torch.bool)
        valid = op.Expand(op.Cast(as_bool, to=onnx.TensorProto.INT32), batch_by_keys)
    place = getattr(_pending, BAND.name)
    return place(q, key, value, valid, window=int(window), causal=int(bool(causal)), dilation=int(dilation),
                 heads=heads, kv_heads=kv_heads, head=head, v_head=v_head,
                 global_tokens=len({int(g) for g in global_tokens or []}), layout=int(layout is not None))

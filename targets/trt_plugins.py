"""effc's TensorRT plugins: one row per effc op that TensorRT has no layer for. Torch-free at import
(tensorrt, torch and triton are imported inside the functions that need them).

How a plugin gets into model.onnx:
  1. The op's "trt" translation (compiler/ops/<op>.py) emits a placeholder node (domain PENDING, op_type =
     the plugin name) over the exporter's tensors: the exporter cannot make the plugin's storage (INT32 views
     of packed bytes) and must not constant-fold the weights.
  2. finalize() turns each placeholder into the plugin node the way TensorRT's ONNX parser matches
     tensorrt.plugin ahead-of-time plugins (TensorRT samples/python/quickly_deployable_plugins: op_type = plugin
     name, string attribute plugin_namespace, aot = 1; the parser also reads plugin_version, default "1"), and
     adds one model-local ONNX function per plugin used (domain DOMAIN, name = plugin name) whose body is the
     reference computation in standard ops. ONNX Runtime inlines model-local functions, so the same model.onnx
     runs on any machine.
  3. The engine builder parses without_functions(model): onnx-tensorrt's ModelImporter.cpp (parseNode)
     dispatches on op_type alone, builtin importers first, then `ctx->localFunctions().count(nodeType)` ->
     LocalFunctionImporter, and only then FallbackPluginImporter. A model-local function of the plugin's name
     would be imported as its body and the plugin never used; without the function the parser falls back to
     the plugin registry (name, plugin_version, plugin_namespace), where register_with_tensorrt() put it.

A new plugin (MoE, ...) is one more Plugin row: its placeholder inputs and attributes, how its
placeholder inputs become plugin inputs (`lower`), its reference function body, and its tensorrt.plugin
registration (`register`).
"""

# No `from __future__ import annotations`: tensorrt.plugin reads the registration functions' annotations as
# classes (issubclass(param.annotation, TensorDesc)).
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from effc.errors import EffcError
from effc.targets.onnx_nodes import replace_nodes

DOMAIN = "effc.trt"  # plugin nodes and their reference functions
PENDING = "effc.internal.trt"  # placeholders, made by the "trt" translations, gone after finalize()
NAMESPACE = "effc"


@dataclass(frozen=True)
class Plugin:
    name: str  # ONNX op_type = tensorrt.plugin name (registered as "<namespace>::<name>")
    op: str  # the effc op it implements ("effc::nf4_linear")
    inputs: tuple[str, ...]  # placeholder inputs (the translation's tensors), in order
    attributes: tuple[str, ...]  # INT attributes, on the placeholder and on the plugin node
    lower: Callable  # (placeholder node, {name: initializer}, shared) -> (plugin node inputs, new initializers)
    body: Callable  # () -> list[NodeProto]: reference computation over `plugin_inputs`, output "y"
    plugin_inputs: tuple[str, ...]  # the plugin node's inputs (= the function's), in the kernel's order
    register: Callable  # (tensorrt.plugin module, Plugin) -> None: desc, autotune, aot_impl
    check: Callable = lambda attrs: None  # {attribute: value} -> why the kernel cannot take this node, or None
    placeholder_attributes: tuple[str, ...] = ()  # INT attributes on the placeholder only: what check() reads
    #                                               (a pattern the kernel refuses), never on the plugin node
    activations: tuple[str, ...] = ("x",)  # placeholder inputs of the activation type (float/fp16/bf16, the output's)
    int32_inputs: tuple[str, ...] = ()  # placeholder inputs of type int32; the others are stored uint8/float tensors
    namespace: str = NAMESPACE
    version: str = "1"
    summary: str = ""
    node_attributes: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "node_attributes", self.attributes + ("plugin_namespace", "plugin_version", "aot"))

    @property
    def qualified(self) -> str:
        return f"{self.namespace}::{self.name}"

    def function(self, opset: int) -> onnx.FunctionProto:
        """The model-local function with the reference computation. It declares every attribute the plugin
        node carries, as ONNX defines a function's call (ONNX Runtime 1.32 would ignore undeclared ones; other
        consumers need not); the plugin attributes (namespace, version, aot) are for TensorRT, unused here."""
        return helper.make_function(DOMAIN, self.name, list(self.plugin_inputs), ["y"], self.body(),
                                    [helper.make_opsetid("", opset)], list(self.node_attributes))


# ----------------------------------------------------------------------------------------------------
# Reference-body helpers: standard ops only, attribute references for the plugin's INT attributes.
# ----------------------------------------------------------------------------------------------------

class _Body:
    """Builds a function body with fresh value names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def __call__(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self._n += 1
        name = out or f"t{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def const(self, value, dtype=np.int64) -> str:
        return self("Constant", value=numpy_helper.from_array(np.asarray(value, dtype)))

    def attr(self, name: str) -> str:
        """A scalar int64 tensor holding the node's INT attribute `name` (Constant value_int = @name)."""
        self._n += 1
        out = f"t{self._n}"
        node = helper.make_node("Constant", [], [out])
        ref = onnx.AttributeProto(name="value_int", ref_attr_name=name, type=onnx.AttributeProto.INT)
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    def bytes_at(self, words: str, index: str) -> str:
        """Byte `index` (int64 tensor) of little-endian INT32 words, as int64 0..255: arithmetic only (no
        bitwise ops on INT32 in every runtime, and no bit-casts in ONNX)."""
        w = self("Gather", words, self("Div", index, self.const(4)))
        w = self("Mod", self("Add", self("Cast", w, to=TensorProto.INT64), self.const(1 << 32)), self.const(1 << 32))
        shift = self("Gather", self.const([1, 1 << 8, 1 << 16, 1 << 24]), self("Mod", index, self.const(4)))
        return self("Mod", self("Div", w, shift), self.const(256))


def int32_words(data: np.ndarray) -> np.ndarray:
    """Bytes -> little-endian INT32 words (zero-padded to a multiple of 4): TensorRT takes UINT8 only as
    network IO and INT8 only behind Q/DQ (support matrix notes), so packed bytes travel as INT32 initializers;
    the kernel reads them through a byte pointer either way."""
    flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    flat = np.concatenate([flat, np.zeros(-len(flat) % 4, np.uint8)])
    return flat.view("<i4").copy()


# ----------------------------------------------------------------------------------------------------
# NF4 dequant-GEMM (effc::nf4_linear): y = x @ W^T, W in bitsandbytes' NF4 layout (effc.formats.nf4).
# Two rows, nf4_gemm (float absmax) and nf4_gemm_dq (double-quantized absmax): their inputs differ in
# number and type, and TensorRT's autotune declares types per IO position, so one row with a mode attribute
# would need optional inputs, which tensorrt.plugin's TensorDesc signature cannot express. Bias is a
# standard Add after the node (TensorRT fuses it), so the kernel runs with HAS_BIAS=False.
# ----------------------------------------------------------------------------------------------------

NF4_TABLE = "effc_nf4_code"  # the 16 NF4 values, one initializer shared by every nf4 node
DYNAMIC_MAP = "effc_dynamic_map"  # bitsandbytes' signed dynamic map (double-quant codes), likewise


def _shared_tables() -> dict[str, np.ndarray]:
    from effc.formats.nf4 import DYNAMIC_MAP_SIGNED, NF4_CODE  # torch; only when finalize() has nf4 nodes

    return {NF4_TABLE: NF4_CODE.numpy().astype(np.float32), DYNAMIC_MAP: DYNAMIC_MAP_SIGNED.numpy().astype(np.float32)}


def _nf4_lower(double_quant: bool):
    def lower(node: onnx.NodeProto, inits: dict[str, TensorProto], shared: dict[str, np.ndarray]):
        base = node.output[0]
        computed = [i for i in node.input[1:] if i not in inits]
        if computed:  # the exporter folded or rewrote a stored weight: the plugin needs the stored bytes
            raise EffcError(f"{node.name or base}: NF4 weight {computed[0]} is computed in the exported graph, not "
                            "stored; the TensorRT plugin needs the stored tensors (use --target onnx or ort)")
        packed = numpy_helper.to_array(inits[node.input[1]])
        new = [numpy_helper.from_array(int32_words(packed), f"{base}_packed")]
        if double_quant:
            codes = numpy_helper.to_array(inits[node.input[2]])
            absmax2 = numpy_helper.to_array(inits[node.input[3]]).astype(np.float32).reshape(-1)
            offset = numpy_helper.to_array(inits[node.input[4]]).astype(np.float32).reshape(1)
            new += [numpy_helper.from_array(int32_words(codes), f"{base}_absmax_codes"),
                    numpy_helper.from_array(absmax2, f"{base}_absmax2"), numpy_helper.from_array(offset, f"{base}_offset")]
            tables = [NF4_TABLE, DYNAMIC_MAP]
        else:
            absmax = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(-1)
            new.append(numpy_helper.from_array(absmax, f"{base}_absmax"))
            tables = [NF4_TABLE]
        for t in tables:
            shared.setdefault(t, _shared_tables()[t])
        return [node.input[0]] + [t.name for t in new] + tables, new
    return lower


def _nf4_body(double_quant: bool):
    def body() -> list[onnx.NodeProto]:
        b = _Body()
        n, k, block = b.attr("N"), b.attr("K"), b.attr("block")
        nk = b("Mul", n, k)
        e = b("Range", b.const(0), nk, b.const(1))  # flat row-major element index
        byte = b.bytes_at("packed", b("Div", e, b.const(2)))
        # element 2j is the high nibble of byte j, 2j+1 the low one
        nibble = b("Mod", b("Div", byte, b("Gather", b.const([16, 1]), b("Mod", e, b.const(2)))), b.const(16))
        values = b("Gather", "code", nibble)
        if double_quant:
            # bitsandbytes' decode: dynamic_map[code8] * absmax2[i // dq_block] + offset, two float32 roundings
            blocks = b("Div", b("Add", nk, b("Sub", block, b.const(1))), block)
            i = b("Range", b.const(0), blocks, b.const(1))
            code8 = b.bytes_at("absmax_codes", i)
            absmax = b("Add", b("Mul", b("Gather", "dynamic_map", code8),
                                b("Gather", "absmax2", b("Div", i, b.attr("dq_block")))), "offset")
        else:
            absmax = "absmax"
        w = b("Mul", values, b("Gather", absmax, b("Div", e, block)))
        shape = b("Concat", b("Unsqueeze", n, b.const([0])), b("Unsqueeze", k, b.const([0])), axis=0)
        w_t = b("Transpose", b("Reshape", w, shape), perm=[1, 0])
        b("MatMul", "x", b("CastLike", w_t, "x"), out="y")
        return b.nodes
    return body


def _nf4_aot(trtp, x, outputs, tactic: int, N: int, K: int, block: int, dq_block: int, double_quant: bool):
    """aot_impl: effc's Triton kernel compiled for the build GPU (triton's active target), launched with
    grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)) and the SymInt32 scalars M (product of x's leading dims), N, K."""
    import tensorrt as trt
    import torch
    import triton

    from effc.targets import triton_nf4

    dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}[x.dtype]
    arch = triton.runtime.driver.active.get_current_target().arch
    k = triton_nf4.plugin_kernel(arch, dtype, double_quant, tactic, N, K, block, dq_block)
    m = x.shape_expr[0]
    for i in range(1, x.ndim - 1):
        m = m * x.shape_expr[i]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(m, k["block_m"])
    launch.grid_y = -(-N // k["block_n"])
    launch.block_x = k["num_warps"] * 32
    launch.shared_mem = k["shared"]
    scalars = {"M": m, "N": N, "K": K}
    return k["name"], k["ptx"], launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(scalars[s]) for s in k["scalars"]])


def _nf4_out(x, N: int):
    y = x.like()
    y.shape_expr[x.ndim - 1] = N
    return y


def _nf4_tune(trtp, fixed: str):
    from effc.targets.triton_nf4 import PLUGIN_TACTICS

    return [trtp.AutoTuneCombination(f"FP32|FP16|BF16, {fixed}, FP32|FP16|BF16", "LINEAR", list(PLUGIN_TACTICS))]


def _register_nf4(trtp, plugin: Plugin) -> None:
    """tensorrt.plugin reads each function's signature (input names, then attributes with their types), so
    each row spells its own; the work is shared above. INT attributes arrive as INT32 plugin fields from the
    ONNX parser (onnx-tensorrt loadFields), which tensorrt.plugin converts with int()."""
    TD = trtp.TensorDesc
    q = plugin.qualified
    if plugin.name == "nf4_gemm":
        @trtp.register(q)
        def desc(x: TD, packed: TD, absmax: TD, code: TD, N: int, K: int, block: int) -> TD:
            return _nf4_out(x, N)

        @trtp.autotune(q)
        def tune(x, packed, absmax, code, outputs):
            return _nf4_tune(trtp, "INT32, FP32, FP32")

        @trtp.aot_impl(q)
        def aot(x, packed, absmax, code, N, K, block, outputs, tactic) -> tuple[
                str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
            return _nf4_aot(trtp, x, outputs, tactic, N, K, block, 256, False)
    else:
        @trtp.register(q)
        def desc_dq(x: TD, packed: TD, absmax_codes: TD, absmax2: TD, offset: TD, code: TD, dynamic_map: TD,
                    N: int, K: int, block: int, dq_block: int) -> TD:
            return _nf4_out(x, N)

        @trtp.autotune(q)
        def tune_dq(x, packed, absmax_codes, absmax2, offset, code, dynamic_map, outputs):
            return _nf4_tune(trtp, "INT32, INT32, FP32, FP32, FP32, FP32")

        @trtp.aot_impl(q)
        def aot_dq(x, packed, absmax_codes, absmax2, offset, code, dynamic_map, N, K, block, dq_block, outputs,
                   tactic) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
            return _nf4_aot(trtp, x, outputs, tactic, N, K, block, dq_block, True)


def _nf4_check(attrs: dict) -> str | None:
    """What the kernel needs: whole 16-wide K tiles (blocks may straddle rows, bnb's flat layout)."""
    if attrs["K"] % 16:
        return f"in_features {attrs['K']} is not a multiple of 16 (the kernel's K tile)"
    if attrs["block"] < 16 or attrs["block"] & (attrs["block"] - 1):
        return f"the NF4 block {attrs['block']} is not a power of two >= 16"
    return None


def _nf4_row(name: str, double_quant: bool) -> Plugin:
    dq = double_quant
    return Plugin(
        name=name, op="effc::nf4_linear",
        inputs=("x", "packed", "absmax") + (("absmax2", "offset") if dq else ()),
        attributes=("N", "K", "block") + (("dq_block",) if dq else ()),
        plugin_inputs=("x", "packed") + (("absmax_codes", "absmax2", "offset", "code", "dynamic_map") if dq
                                         else ("absmax", "code")),
        lower=_nf4_lower(dq), body=_nf4_body(dq), register=_register_nf4, check=_nf4_check,
        summary="NF4 dequant-GEMM" + (" (double-quantized absmax)" if dq else ""))


# ----------------------------------------------------------------------------------------------------
# Band attention (effc::window_attention without global tokens or a layout): the flash-style Triton kernel of
# targets/triton_window_attention.py, which reads only the key blocks the band reaches. One row: the
# translation (targets/window_attention_trt.py) makes the inputs fixed in number and type, as tensorrt.plugin's
# autotune declares types per IO position: key_valid is always an int32 [B, T] (all ones when the op has none),
# and the query arrives multiplied by the op's scale (a standard Mul), since the placeholder and
# tensorrt.plugin's SymInt32 scalars carry integers only. Patterns the kernel does not compute are refused by
# check() through two placeholder-only attributes (an EffcError raised inside a translation reaches the user
# wrapped in the exporter's ConversionError).
# ----------------------------------------------------------------------------------------------------

BAND_MAX_HEAD = 256  # = triton_window_attention.MAX_HEAD (that module imports torch and triton)


def _band_lower(node: onnx.NodeProto, inits: dict[str, TensorProto], shared: dict[str, np.ndarray]):
    """No weights: the plugin reads the placeholder's tensors as they are."""
    return list(node.input), []


def _band_body() -> list[onnx.NodeProto]:
    """A dense masked attention over the band (O(S*T), only right): the op's allowed_mask without global tokens
    or layout, GQA heads n -> n // (heads // kv_heads), softmax in float32, rows without a key 0."""
    b = _Body()
    window, dilation, heads, kv_heads = b.attr("window"), b.attr("dilation"), b.attr("heads"), b.attr("kv_heads")
    causal = b("Cast", b.attr("causal"), to=TensorProto.BOOL)

    def vec(scalar):
        return b("Unsqueeze", scalar, b.const([0]))

    zero, one = b.const(0), b.const(1)
    s = b("Squeeze", b("Shape", "query", start=2, end=3), b.const([0]))
    t = b("Squeeze", b("Shape", "key", start=2, end=3), b.const([0]))
    r = b("Sub", b("Unsqueeze", b("Range", b("Sub", t, s), t, one), b.const([1])), b("Range", zero, t, one))  # [S, T]
    span = b("Mul", window, dilation)
    one_side = b("And", b("And", b("GreaterOrEqual", r, zero), b("Less", r, span)), causal)
    both_sides = b("And", b("Less", b("Abs", r), span), b("Not", causal))  # (no Where on bool in ONNX Runtime)
    inside = b("Or", one_side, both_sides)
    band = b("And", inside, b("Equal", b("Mod", r, dilation), zero))
    valid = b("Cast", b("Unsqueeze", "key_valid", b.const([1, 2, 3])), to=TensorProto.BOOL)  # [B, 1, 1, 1, T]
    mask = b("And", band, valid)  # [B, 1, 1, S, T]
    grouped = b("Concat", b.const([0]), vec(kv_heads), vec(b("Div", heads, kv_heads)), b.const([-1]),
                vec(b.attr("head")), axis=0)
    q = b("Reshape", "query", grouped)  # [B, KV, rep, S, D]
    keys_t = b("Transpose", b("Unsqueeze", "key", b.const([2])), perm=[0, 1, 2, 4, 3])  # [B, KV, 1, D, T]
    scores = b("Cast", b("MatMul", q, keys_t), to=TensorProto.FLOAT)
    probs = b("Softmax", b("Where", mask, scores, b.const(-1e30, np.float32)), axis=-1)
    probs = b("Mul", probs, b("ReduceMax", b("Cast", mask, to=TensorProto.FLOAT), b.const([-1]), keepdims=1))
    out = b("MatMul", b("CastLike", probs, "value"), b("Unsqueeze", "value", b.const([2])))  # [B, KV, rep, S, Dv]
    b("Reshape", out, b("Concat", b.const([0]), vec(heads), b.const([-1]), vec(b.attr("v_head")), axis=0), out="y")
    return b.nodes


def _band_aot(trtp, query, key, outputs, tactic: int, window: int, causal: int, dilation: int, heads: int,
              kv_heads: int, head: int, v_head: int):
    """aot_impl: the band kernel compiled for the build GPU (triton's active target), launched with grid
    (cdiv(S, BLOCK_M), B * heads) and the SymInt32 scalars S (query length) and T (key length)."""
    import tensorrt as trt
    import torch
    import triton

    from effc.targets import triton_window_attention

    dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}[query.dtype]
    arch = triton.runtime.driver.active.get_current_target().arch
    k = triton_window_attention.plugin_kernel(arch, dtype, tactic, window, causal, dilation, heads, kv_heads, head,
                                              v_head)
    s, t = query.shape_expr[2], key.shape_expr[2]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(s, k["block_m"])
    launch.grid_y = query.shape_expr[0] * heads
    launch.block_x = k["num_warps"] * 32
    launch.shared_mem = k["shared"]
    scalars = {"S": s, "T": t}
    return k["name"], k["ptx"], launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(scalars[n]) for n in k["scalars"]])


def _register_band(trtp, plugin: Plugin) -> None:
    """tensorrt.plugin's functions for band_attention (signatures as _register_nf4 explains)."""
    TD = trtp.TensorDesc
    q = plugin.qualified

    @trtp.register(q)
    def desc(query: TD, key: TD, value: TD, key_valid: TD, window: int, causal: int, dilation: int, heads: int,
             kv_heads: int, head: int, v_head: int) -> TD:
        y = query.like()
        y.shape_expr[3] = v_head
        return y

    @trtp.autotune(q)
    def tune(query, key, value, key_valid, outputs):
        from effc.targets.triton_window_attention import PLUGIN_TACTICS

        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, INT32, FP32|FP16|BF16",
                                         "LINEAR", list(PLUGIN_TACTICS))]

    @trtp.aot_impl(q)
    def aot(query, key, value, key_valid, window, causal, dilation, heads, kv_heads, head, v_head, outputs,
            tactic) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return _band_aot(trtp, query, key, outputs, tactic, window, causal, dilation, heads, kv_heads, head, v_head)


def _band_check(attrs: dict) -> str | None:
    """What the kernel computes: the band (causal or both sides, dilated) with key_valid, GQA heads."""
    if attrs.get("global_tokens"):
        return f"{attrs['global_tokens']} global token position(s) (the kernel computes the band only)"
    if attrs.get("layout"):
        return "a block-sparse layout (the kernel computes the band only)"
    if attrs["dilation"] < 1:
        return f"dilation {attrs['dilation']} is not >= 1"
    if attrs["kv_heads"] < 1 or attrs["heads"] % attrs["kv_heads"]:
        return f"{attrs['heads']} query heads are not a multiple of {attrs['kv_heads']} key/value heads"
    if max(attrs["head"], attrs["v_head"]) > BAND_MAX_HEAD:
        return f"head size {max(attrs['head'], attrs['v_head'])} is above the kernel's {BAND_MAX_HEAD}"
    return None


BAND = Plugin(
    name="band_attention", op="effc::window_attention", inputs=("query", "key", "value", "key_valid"),
    attributes=("window", "causal", "dilation", "heads", "kv_heads", "head", "v_head"),
    plugin_inputs=("query", "key", "value", "key_valid"), lower=_band_lower, body=_band_body,
    register=_register_band, check=_band_check, placeholder_attributes=("global_tokens", "layout"),
    activations=("query", "key", "value"), int32_inputs=("key_valid",),
    summary="banded (sliding-window, dilated) flash attention with key_valid and GQA heads")

PLUGINS: dict[str, Plugin] = {p.name: p for p in (_nf4_row("nf4_gemm", False), _nf4_row("nf4_gemm_dq", True), BAND)}


# ----------------------------------------------------------------------------------------------------
# Placeholders (what the "trt" translations emit)
# ----------------------------------------------------------------------------------------------------

def _register_placeholder_schemas() -> None:
    from onnx.defs import OpSchema

    for p in PLUGINS.values():
        if onnx.defs.has(p.name, PENDING):
            continue
        params = [OpSchema.FormalParameter(i, "T" if i in p.activations else "T" + i) for i in p.inputs]
        constraints = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")]
        constraints += [("T" + i, ["tensor(int32)"] if i in p.int32_inputs else ["tensor(uint8)", "tensor(float)"], i)
                        for i in p.inputs if i not in p.activations]
        attributes = [OpSchema.Attribute(a, OpSchema.AttrType.INT) for a in p.attributes + p.placeholder_attributes]
        onnx.defs.register_schema(OpSchema(
            p.name, PENDING, 1, inputs=params, outputs=[OpSchema.FormalParameter("y", "T")],
            type_constraints=constraints, attributes=attributes))


_register_placeholder_schemas()


def placeholder_opset():
    """The onnxscript Opset the "trt" translations call: placeholder(plugin name)(*inputs, **attributes)."""
    from onnxscript.values import Opset

    return Opset(PENDING, 1)


# ----------------------------------------------------------------------------------------------------
# The contract used by the trt target and the engine builder
# ----------------------------------------------------------------------------------------------------

def plugin_of(node: onnx.NodeProto) -> Plugin | None:
    """The registered plugin `node` calls (domain DOMAIN, op_type = its name, plugin_namespace = its
    namespace), else None."""
    if node.domain != DOMAIN:
        return None
    p = PLUGINS.get(node.op_type)
    ns = next((a.s.decode() for a in node.attribute if a.name == "plugin_namespace"), None)
    return p if p is not None and ns == p.namespace else None


def _opset(model: onnx.ModelProto) -> int:
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


def finalize(model: onnx.ModelProto) -> int:
    """Placeholders -> plugin nodes (+ their initializers) and one model-local reference function per plugin
    used; returns how many nodes were replaced. In place; a node the plugin cannot take raises EffcError
    before anything is changed."""
    for node in model.graph.node:
        p = PLUGINS.get(node.op_type) if node.domain == PENDING else None
        why = p and p.check({a.name: a.i for a in node.attribute})
        if why:
            raise EffcError(f"{p.op} at {node.name or node.output[0]} has no TensorRT plugin: {why}; use --target "
                            "onnx or ort")
    inits = {t.name: t for t in model.graph.initializer}
    shared: dict[str, np.ndarray] = {}
    nodes, used, count = [], {}, 0
    for node in model.graph.node:
        if node.domain != PENDING:
            nodes.append(node)
            continue
        p = PLUGINS[node.op_type]
        attrs = {a.name: a.i for a in node.attribute}
        inputs, new = p.lower(node, inits, shared)
        nodes.append(helper.make_node(p.name, inputs, list(node.output), name=node.name, domain=DOMAIN,
                                      plugin_namespace=p.namespace, plugin_version=p.version, aot=1,
                                      **{a: attrs[a] for a in p.attributes}))
        nodes[-1].metadata_props.extend(node.metadata_props)
        model.graph.initializer.extend(new)
        used[p.name] = p
        count += 1
    if not count:
        return 0
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in shared.items() if k not in inits)
    replace_nodes(model, nodes)
    opset = _opset(model)
    have = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(p.function(opset) for p in used.values() if (DOMAIN, p.name) not in have)
    imports = [i for i in model.opset_import if i.domain not in (PENDING, DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend(imports + [helper.make_opsetid(DOMAIN, 1)])
    return count


def without_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the plugins' reference functions: what the engine builder hands trt.OnnxParser, so the
    parser takes the plugin and never the body (module docstring, point 3)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [f for f in out.functions if not (f.domain == DOMAIN and f.name in PLUGINS)]
    del out.functions[:]
    out.functions.extend(keep)
    return out


_registered = False


def register_with_tensorrt() -> None:
    """Register every plugin with tensorrt.plugin (desc, autotune, aot_impl). Idempotent."""
    global _registered
    if _registered:
        return
    import tensorrt.plugin as trtp

    for p in PLUGINS.values():
        p.register(trtp, p)
    _registered = True

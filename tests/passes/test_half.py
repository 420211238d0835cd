"""fp16 / bf16: the precision policy node by node on a small model against a reference written here with
explicit casts; weights, kept ops and IO dtypes on Llama and BERT, in the fx graph and in model.onnx (by
ONNX shape inference); compiled onnx/ort artifacts verified and their accuracy against eager; bf16 in
PyTorch, and its refusal to claim a verification ONNX Runtime's CPU provider cannot do; config and ordering."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import effc
from effc.capture import capture, run_torch
from effc.errors import EffcError
from effc.inputs import dynamic_dims, example_inputs
from effc.passes import registry
from effc.passes.base import PassContext
from effc.passes.half import Bf16, Fp16, HalfConfig
from effc.passes.program import parameter_bytes
from effc.runtime.compare import Tolerance, compare
from examples.models import build

aten = torch.ops.aten
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def _captured(model, example=None):
    example = example if example is not None else example_inputs(model, model.config, None, None)
    return capture(model, example, dynamic_dims(example)), example


def _run(pass_, captured, example):
    result = pass_.run(captured.program, PassContext(example_inputs=example))
    return result, run_torch(result.ir.module(), example, captured.output_names)


def _in_dtypes(ep, target) -> list[torch.dtype]:
    """The dtype of the first input of every `target` node."""
    return [n.args[0].meta["val"].dtype for n in ep.graph.nodes if n.target is target]


def _state(ep) -> dict[str, torch.Tensor]:
    return {**ep.state_dict, **ep.constants}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.out = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)

    def forward(self, x, ids):
        p = torch.softmax(self.out(self.norm(self.lin(x))), -1)
        steps = torch.arange(x.shape[-1], dtype=torch.float32)  # a factory op: keeps float32
        return {"p": p, "total": x.sum(-1) + steps.mean(), "ids": ids * 2}


def test_policy_node_by_node_against_explicit_casts():
    """Linears in fp16, LayerNorm / softmax / sum in float32, the factory float32, integers untouched, and the
    numbers equal to the same computation written with explicit casts."""
    torch.manual_seed(0)
    model = Tiny().eval()
    example = {"x": torch.randn(3, 8), "ids": torch.arange(6).reshape(3, 2)}
    captured, _ = _captured(model, example)
    result, got = _run(Fp16(), captured, example)
    ep = result.ir
    assert _in_dtypes(ep, aten.linear.default) == [F16, F16]
    assert _in_dtypes(ep, aten.layer_norm.default) == [F32]
    assert _in_dtypes(ep, aten.softmax.int) == [F32] and _in_dtypes(ep, aten.sum.dim_IntList) == [F32]
    assert _in_dtypes(ep, aten.mean.default) == [F32]  # arange's float32, as the model made it
    sd = _state(ep)
    assert {k: v.dtype for k, v in sd.items()} == {"model.lin.weight": F16, "model.lin.bias": F16, "model.out.weight": F16,
                                                   "model.out.bias": F16, "model.norm.weight": F32, "model.norm.bias": F32}
    assert result.counts["weights converted"] == 4 and result.counts["weights kept in float32"] == 2
    assert result.counts["ops kept in float32 (norm)"] == 1 and result.counts["ops kept in float32 (softmax)"] == 1
    tags = {n.meta.get("effc_provenance") for n in ep.graph.nodes if n.target is aten.to.dtype}
    assert tags == {"fp16/cast_to_fp16", "fp16/cast_to_fp32"}

    x, ids = example["x"], example["ids"]
    with torch.no_grad():
        h = torch.nn.functional.linear(x.half(), model.lin.weight.half(), model.lin.bias.half())
        n = torch.nn.functional.layer_norm(h.float(), (16,), model.norm.weight, model.norm.bias)
        o = torch.nn.functional.linear(n.half(), model.out.weight.half(), model.out.bias.half())
        want = {"p": torch.softmax(o.float(), -1), "total": x.sum(-1) + torch.arange(8.0).mean(), "ids": ids * 2}
    for name, value in want.items():
        assert got[name].dtype == value.numpy().dtype
        np.testing.assert_allclose(got[name], value.numpy(), rtol=0, atol=1e-6)
    assert model.lin.weight.dtype == F32  # the eager model is never touched


def test_nothing_to_convert_is_no_change():
    class Ints(torch.nn.Module):
        def forward(self, ids):
            return ids * 3 + 1

    example = {"ids": torch.arange(4).reshape(2, 2)}
    captured, _ = _captured(Ints(), example)
    result, got = _run(Fp16(), captured, example)
    assert not result.changed and result.ir is captured.program
    assert result.counts["weights converted"] == 0 and result.counts["casts inserted"] == 0


class MaskedAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        additive = (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive)


def test_float32_attention_mask_saturates_to_fp16():
    """A mask of float32's finfo.min cast to fp16 is -inf, and a fully masked row (padding) then NaN where
    attention is a plain Softmax (ONNX; torch's CPU kernel returns zeros): the pass clamps it to fp16's range
    first. Rows with keys to attend match float32."""
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[0, 3:] = 0
    mask[1] = 0  # every key masked
    example = {"x": torch.randn(2, 5, 16), "mask": mask}
    assert torch.tensor(torch.finfo(torch.float32).min).half().isinf()  # the hazard
    captured, _ = _captured(model, example)
    result, got = _run(Fp16(), captured, example)
    assert result.rules["fp16/mask_to_fp16"] == 1
    sdpa = next(n for n in result.ir.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    cast = sdpa.args[3]
    assert cast.target is aten.to.dtype and cast.args[1] == F16
    assert cast.args[0].target is aten.clamp.default and cast.args[0].args[1:] == (-65504.0, 65504.0)
    out = captured.output_names[0]
    assert np.isfinite(got[out]).all()
    eager = run_torch(captured.module, example, captured.output_names)
    first = compare({out: eager[out][:1]}, {out: got[out][:1]}, Tolerance(float("inf"), 0)).outputs[0]
    assert first.sqnr_db > 45


@pytest.fixture(scope="module")
def llama():
    return _captured(build("llama"))


@pytest.fixture(scope="module")
def bert():
    return _captured(build("bert"))


def test_bf16_in_pytorch(llama):
    """bf16 is checked in PyTorch (ONNX Runtime's CPU provider cannot run it): linear and embedding weights
    bf16, RMSNorm weights and the rotary frequencies float32, the RMSNorm mean in float32, logits float32,
    and the graph close to eager (44.8 dB measured)."""
    captured, example = llama
    result, got = _run(Bf16(), captured, example)
    sd = _state(result.ir)
    assert all(sd[k].dtype == BF16 for k in sd if k.endswith("proj.weight") or k.endswith("embed_tokens.weight"))
    assert all(sd[k].dtype == F32 for k in sd if "norm" in k or "inv_freq" in k)
    assert set(_in_dtypes(result.ir, aten.mean.dim)) == {F32}
    assert set(_in_dtypes(result.ir, aten.linear.default)) == {BF16}
    eager = run_torch(captured.module, example, captured.output_names)
    acc = compare(eager, got, Tolerance(float("inf"), 0)).outputs[0]
    assert got["logits"].dtype == np.float32
    assert acc.sqnr_db > 38 and acc.top1_agreement > 0.99
    assert parameter_bytes(result.ir) < 0.55 * parameter_bytes(captured.program)


def test_keep_modules_lm_head_keeps_logits_in_float32(llama):
    captured, example = llama
    result, _ = _run(Fp16(HalfConfig(keep_modules=("lm_head",))), captured, example)
    sd = _state(result.ir)
    assert sd["model.lm_head.weight"].dtype == F32 and sd["model.model.layers.0.mlp.up_proj.weight"].dtype == F16
    head = [n for n in result.ir.graph.nodes if n.target is aten.linear.default][-1]
    assert head.args[0].meta["val"].dtype == F32 and head.meta["val"].dtype == F32
    assert result.counts["ops kept in float32 (keep_modules)"] == 1
    result, _ = _run(Fp16(HalfConfig(keep_modules=("nothing_like_this",))), captured, example)
    assert "fp16.keep_modules pattern 'nothing_like_this' matched no module" in result.notes


def test_keep_fp32_empty_converts_norms_too(llama, bert):
    captured, example = bert
    result, _ = _run(Fp16(HalfConfig(keep_fp32=())), captured, example)
    assert set(_in_dtypes(result.ir, aten.layer_norm.default)) == {F16}
    assert all(v.dtype == F16 for k, v in _state(result.ir).items() if "LayerNorm" in k)
    captured, example = llama
    result, _ = _run(Fp16(HalfConfig(keep_fp32=())), captured, example)
    assert set(_in_dtypes(result.ir, aten.mean.dim)) == {F16}
    assert all(v.dtype == F16 for k, v in _state(result.ir).items() if "layernorm" in k)


def test_config_and_ordering_errors():
    with pytest.raises(EffcError) as e:
        registry.resolve(["fp16"], ["fp16.keep_fp32=norm,softmaxes"])
    assert "'softmaxes' is not one of norm, softmax, reduce" in str(e.value) and "\n" not in str(e.value)
    assert registry.resolve(["fp16"], ["fp16.keep_fp32="])[0].config.keep_fp32 == ()
    with pytest.raises(EffcError, match="pass fp16 must run after int8, which provides quantized_weights"):
        registry.resolve(["fp16", "int8"])
    assert [p.name for p in registry.resolve(["merge_lora", "int8", "bf16"])] == ["merge_lora", "int8", "bf16"]


def test_after_int8_effc_ops_compute_in_float32(llama):
    """int8 then fp16: effc's ops read float32 (the ONNX targets lower them so), the rest is half."""
    captured, example = llama
    int8 = registry.resolve(["int8"])[0].run(captured.program, PassContext(example_inputs=example)).ir
    eager = run_torch(captured.module, example, captured.output_names)
    alone = compare(eager, run_torch(int8.module(), example, captured.output_names), Tolerance(float("inf"), 0))
    result = Fp16().run(int8, PassContext(example_inputs=example))
    effc_ops = [n for n in result.ir.graph.nodes if getattr(n.target, "namespace", None) == "effc"]
    floats = [a.meta["val"].dtype for n in effc_ops for a in n.all_input_nodes if a.meta["val"].dtype.is_floating_point]
    assert effc_ops and floats and set(floats) == {F32}
    before = {k: v.dtype for k, v in _state(int8).items() if not v.is_floating_point()}
    assert before and {k: _state(result.ir)[k].dtype for k in before} == before  # int8 codes untouched
    both = compare(eager, run_torch(result.ir.module(), example, captured.output_names), Tolerance(float("inf"), 0))
    assert both.outputs[0].sqnr_db > alone.outputs[0].sqnr_db - 1  # fp16 adds little to int8's error


def test_bf16_refuses_a_verification_onnxruntime_cannot_do():
    reason = Bf16().unverifiable("ort")
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert reason is None
    else:
        assert "no bfloat16 kernels" in reason and "--no-verify" in reason and "\n" not in reason
    assert Bf16().unverifiable("torch") is None and Fp16().unverifiable("ort") is None


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    types.update({o: n.attribute[0].t.data_type for n in g.node if n.op_type == "Constant" for o in n.output})
    return types


def _consumers(model: onnx.ModelProto, name: str) -> set[str]:
    return {n.op_type for n in model.graph.node if name in n.input}


@pytest.mark.parametrize("arch,target,kept_op", [("llama", "ort", "SimplifiedLayerNormalization"),
                                                 ("bert", "onnx", "LayerNormalization")])
def test_compiled_artifact(hf_dir, tmp_path, arch, target, kept_op):
    """The artifact verifies against the graph after the pass, its weights are fp16 except the norms', its
    matmuls read fp16 and its kept ops float32 (ONNX shape inference), its IO is as before, and its accuracy
    against eager is reported (measured: llama/ort 67.5 dB, bert/onnx 71.4 dB)."""
    report = effc.compile(str(hf_dir(arch)), tmp_path / "a", passes=["fp16"], target=target)
    assert report.verification["passed"]
    assert all(o["sqnr_db"] > 50 for o in report.accuracy_vs_eager["outputs"])
    model = onnx.load(str(tmp_path / "a" / "model.onnx"))
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    inits = {i.name: i for i in model.graph.initializer}
    floats = {k: i for k, i in inits.items() if i.data_type in (f16, f32)}
    big = {k: i for k, i in floats.items() if np.prod(i.dims) > 1}
    kept = {k for k, i in big.items() if i.data_type == f32}
    assert all("norm" in k.lower() or "inv_freq" in k for k in kept), kept
    half = sum(np.prod(i.dims) for i in big.values() if i.data_type == f16)
    assert half > 0.95 * sum(np.prod(i.dims) for i in big.values())
    types = _types(model)
    kept_nodes = [n for n in model.graph.node if n.op_type == kept_op]
    assert kept_nodes and all(types[n.input[0]] == f32 for n in kept_nodes)
    if target == "onnx":  # projections and attention in fp16. (ONNX Runtime's CPU provider has no fp16 MatMul:
        # the ort target's graph, optimized for it at build time, computes them in float32 from the fp16 weights.)
        matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
        assert len(matmuls) >= 12 and all(types[i] == f16 for n in matmuls for i in n.input[:2])
    # token inputs int64, a decoder's past float32 as before the pass (the cache stays float32 at the boundary)
    assert all(i.type.tensor_type.elem_type == (f32 if i.name.startswith("past_key_values") else onnx.TensorProto.INT64)
               for i in model.graph.input)
    assert all(o.type.tensor_type.elem_type == f32 for o in model.graph.output)


def test_bf16_builds_with_no_verify(hf_dir, tmp_path):
    report = effc.compile(str(hf_dir("llama")), tmp_path / "b", passes=["bf16"], target="onnx", verify=False)
    assert report.accuracy_not_measured and report.accuracy_vs_eager is None
    assert report.graph_accuracy_vs_eager["outputs"][0]["sqnr_db"] > 38
    model = onnx.load(str(tmp_path / "b" / "model.onnx"))
    kinds = {i.data_type for i in model.graph.initializer if np.prod(i.dims) > 1000}
    assert kinds == {onnx.TensorProto.BFLOAT16}


@pytest.mark.slow  # ~100 s: AOTInductor compiles the fp16 graph for the CPU
def test_torch_target_runs_fp16(hf_dir, tmp_path):
    report = effc.compile(str(hf_dir("llama")), tmp_path / "t", passes=["fp16"], target="torch")
    assert report.verification["passed"]
    assert report.accuracy_vs_eager["outputs"][0]["sqnr_db"] > 50  # 64.3 dB measured


@pytest.mark.slow  # ~80 s
def test_minilm_fp16_accuracy(minilm_dir, tmp_path):
    """The trained all-MiniLM-L6-v2 in fp16 against eager fp32 (measured: 63.9 dB on the artifact, 60.1 dB
    on the graph; cosine 0.9999998)."""
    src = next(p.parent for p in minilm_dir.rglob("config.json"))
    report = effc.compile(str(src), tmp_path / "m", passes=["fp16"], target="onnx")
    assert report.verification["passed"]
    out = report.accuracy_vs_eager["outputs"][0]
    assert out["name"] == "last_hidden_state" and out["sqnr_db"] > 55 and out["cosine"] > 0.99999


def test_bf16_compile_that_would_verify_is_refused_in_one_line(hf_dir, tmp_path):
    if Bf16().unverifiable("onnx") is None:
        pytest.skip("ONNX Runtime's CUDA provider is here: bf16 artifacts can be verified")
    with pytest.raises(EffcError, match="ONNX Runtime's CPU provider has no bfloat16 kernels"):
        effc.compile(str(hf_dir("llama")), tmp_path / "v", passes=["bf16"], target="onnx")
    assert not (tmp_path / "v").exists()

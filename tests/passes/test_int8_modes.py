"""int8 per-token dynamic and weight-only modes, SmoothQuant and auto_exclude: reference ops against the
published formulas in numpy, each target's lowering against the reference op on one layer, and what
each feature is for, shown on a Llama with planted activation outliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import effc
import effc.formats.int8
from effc.errors import EffcError
from effc.passes.registry import resolve
from effc.passes.smoothquant import factors
from tests.passes.test_int8 import numpy_weight_codes, planted_llama, token_npz


class OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(96, 40)

    def forward(self, x):
        return self.proj(x)


def one_linear():
    """A factory source: one linear layer with outlier-heavy inputs (rows of very different magnitude)."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 96)
    x[:, :, :2] *= 20
    x[0] *= 0.05
    return OneLinear(), {"x": x}


def test_per_token_reference_matches_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32) * np.array([0.01, 1, 30, 2, 5])[None, :, None].astype(np.float32)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    x_scale = (np.abs(x).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    xq = np.round(x / x_scale).astype(np.int64)
    wq, w_scale = numpy_weight_codes(w)
    want = (xq @ wq.T) * (x_scale.astype(np.float64) * w_scale)
    q, scale = effc.formats.int8.quantize_weight_per_channel(torch.from_numpy(w))
    got = torch.ops.effc.int8_linear_per_token(torch.from_numpy(x), q, scale).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # per-token keeps the small row accurate where one scale for the tensor cannot
    exact = x @ w.T
    per_tensor = torch.ops.effc.int8_linear_dynamic(torch.from_numpy(x), q, scale).numpy()
    row = (0, 0)
    assert np.abs(got[row] - exact[row]).max() < 0.2 * np.abs(per_tensor[row] - exact[row]).max()


def test_weight_only_reference_matches_formula():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    wq, w_scale = numpy_weight_codes(w, "full")  # no int8 GEMM: the pass keeps the full range
    q, scale = effc.formats.int8.quantize_weight_per_channel(torch.from_numpy(w), "full")
    got = torch.ops.effc.int8_linear_weight_only(torch.from_numpy(x), q, scale).numpy()
    np.testing.assert_allclose(got, x @ (wq * w_scale[:, None]).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("config", ["int8.activations=per_token", "int8.mode=weight_only"])
def test_lowering_reproduces_reference_op(target, config, tmp_path, monkeypatch):
    """One layer, so no upstream difference can flip a rounding: the artifact equals the graph within 1e-5
    (relative to the output's scale). ort: per-token Q + MatMulIntegerToFloat; weight-only MatMulNBits."""
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])
    report = effc.compile("tests.passes.test_int8_modes:one_linear", tmp_path / "q", passes=["int8"],
                          pass_config=[config], target=target, atol=1e-5, rtol=1e-5)
    assert "quantized_rounding" not in report.verification, report.verification  # equal, not merely as accurate
    acc = report.accuracy_vs_eager["outputs"][0]  # the artifact's, against the float layer
    assert acc["cosine"] > 0.999 and acc["sqnr_db"] > 30, acc
    if target == "ort":
        want = "com.microsoft.MatMulNBits" if "weight_only" in config else "com.microsoft.MatMulIntegerToFloat"
        assert report.ops.get(want) == 1
    else:
        assert not any(k.startswith("com.microsoft") for k in report.ops)


def test_smoothquant_factors_formula():
    rng = np.random.default_rng(3)
    x_absmax = np.abs(rng.standard_normal(16)) * 10
    x_absmax[3] = 0
    w1, w2 = rng.standard_normal((8, 16)), rng.standard_normal((4, 16))
    w_absmax = np.maximum(np.abs(w1).max(0), np.abs(w2).max(0))
    want = np.clip(x_absmax ** 0.6 / w_absmax ** 0.4, 1e-5, None)
    want[3] = 1.0
    got = factors(torch.tensor(x_absmax), [torch.tensor(w1), torch.tensor(w2)], 0.6).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return planted_llama(root / "model"), token_npz(tmp_path_factory, 512, seed=5)


def _compile(planted, tmp_path, *config, mode="static"):
    model, data = planted
    out = tmp_path / f"a{len(list(tmp_path.iterdir()))}"
    report = effc.compile(str(model), out, passes=["int8"], target="ort", calib_data=str(data),
                          calib_method="minmax", pass_config=["int8.embeddings=false", f"int8.mode={mode}", *config])
    return report


def test_smoothquant_rescues_static_int8(planted, tmp_path):
    """Planted activation outliers wreck per-tensor static int8; SmoothQuant (alpha 0.5) migrates them
    into the weights. Llama's RMSNorm gains absorb 1/s (4 norms: 2 layers x attention, MLP); the
    o/down projections and lm_head get an explicit scale."""
    plain = _compile(planted, tmp_path)
    smooth = _compile(planted, tmp_path, "int8.smoothquant_alpha=0.5")
    p, s = (r.accuracy_vs_eager["outputs"][0]["sqnr_db"] for r in (plain, smooth))
    print(f"static int8 logits SQNR: plain {p:.1f} dB, SmoothQuant {s:.1f} dB")
    assert s > p + 10
    counts = smooth.passes[0].counts
    assert counts["SmoothQuant norms folded"] == 4 and counts["SmoothQuant scales in the graph"] == 5


def test_smoothquant_auto_picks_the_best_alpha(planted, tmp_path):
    """alpha=auto tries 0.3..0.9 on the calibration batches and keeps the one closest to float."""
    plain = _compile(planted, tmp_path)
    auto = _compile(planted, tmp_path, "int8.smoothquant_alpha=auto")
    note = auto.passes[0].notes[0]
    chosen = float(note.split("chose ")[1].split()[0])
    tried = dict(part.split(": ") for part in note.split("cosine: ")[1].rstrip(")").split(", "))
    assert len(tried) == 7 and float(tried[str(chosen)]) == max(float(c) for c in tried.values())
    gain = auto.accuracy_vs_eager["outputs"][0]["sqnr_db"] - plain.accuracy_vs_eager["outputs"][0]["sqnr_db"]
    assert gain > 10


def test_smoothing_alone_keeps_the_function(planted):
    """X/s and W*s: before any rounding, the smoothed float graph computes what the model does."""
    from effc import sources
    from effc.calibration import collect
    from effc.capture import capture
    from effc.inputs import dynamic_dims, example_inputs
    from effc.passes.program import add_parameter, edit, module_name, rebuild
    from effc.passes.smoothquant import smooth

    model, data = planted
    src = sources.load(str(model))
    example = example_inputs(src.model, src.config, None, None)
    ep = capture(src.model, example, dynamic_dims(example)).program
    ranges = collect(src, ep, example, str(data), "minmax")["tensors"]
    gm, signature, state_dict, constants = edit(ep)
    weights = {s.arg.name: state_dict.get(s.target) for s in signature.input_specs if hasattr(s.arg, "name")}
    layers = {n: (module_name(n), weights[n.args[1].name]) for n in gm.graph.nodes
              if n.target is torch.ops.aten.linear.default}
    done = smooth(gm, signature, state_dict, layers, ranges, 0.5)
    for node, w in done.weights.items():
        node.replace_input_with(node.args[1], add_parameter(gm, signature, state_dict, f"{layers[node][0]}.w_s", w))
    smoothed = rebuild(ep, gm, signature, state_dict, constants)
    with torch.no_grad():
        ref = ep.module()(**example)[0]
        got = smoothed.module()(**example)[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # and the smoothed activations are flatter: the largest channel range shrank
    q = "model.layers.0.self_attn.q_proj"
    assert max(done.stats[q]["channel_absmax"]) < 0.5 * max(ranges[q]["channel_absmax"])


def test_auto_exclude_keeps_the_planted_layers_in_float(planted, tmp_path):
    """Budget 0.001 cosine drop: the layers kept in float are among those reading planted outliers
    (q/k/v and gate/up of both layers), found from the layer-wise ranking (the fewest that meet the
    budget: 7 of the 10 with the default weight range, 10 with int8.weight_range=full), and the budget holds."""
    plain = _compile(planted, tmp_path, mode="dynamic")
    auto = _compile(planted, tmp_path, "int8.auto_exclude=0.001", mode="dynamic")
    counts, notes = auto.passes[0].counts, auto.passes[0].notes
    kept = notes[-1].split("kept in float: ")[1].split(", ")
    planted_layers = {f"model.layers.{i}.{m}" for i in (0, 1) for m in
                      ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert set(kept) <= planted_layers and counts["layers kept in float by auto_exclude"] == len(kept) >= 5
    cosine = float(notes[-1].split("mean output cosine ")[1].split()[0])
    assert cosine >= 0.999
    assert auto.accuracy_vs_eager["outputs"][0]["sqnr_db"] > plain.accuracy_vs_eager["outputs"][0]["sqnr_db"] + 10


@pytest.mark.parametrize("config, needle", [
    (["int8.mode=static", "int8.activations=per_token"], "per_token is for int8.mode=dynamic"),
    (["int8.mode=weight_only", "int8.smoothquant_alpha=0.5"], "weight_only keeps activations in float"),
    (["int8.outlier_threshold=6", "int8.smoothquant_alpha=0.5"], "not both"),
    (["int8.smoothquant_alpha=1.5"], "outside [0, 1]"),
    (["int8.auto_exclude=2"], "cosine drop in (0, 1)"),
])
def test_bad_combinations_are_refused(config, needle):
    from effc.passes.base import Need

    import re

    with pytest.raises(EffcError, match=re.escape(needle)):
        resolve(["int8"], config, have={Need.EXAMPLE_INPUTS, Need.CALIBRATION})


def test_smoothquant_needs_calibration():
    with pytest.raises(EffcError, match="needs calibration"):
        resolve(["int8"], ["int8.smoothquant_alpha=0.5"])

"""sparse_attention (issue 14): exact mode on sliding-window decoders changes no output, past the window,
on every target, with and without the KV cache; the rewrite count is the number of windowed layers and
the dense layers stay; approximate patterns compile and report accuracy; bad settings are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import effc
from effc.runtime import open as open_artifact
from examples.models import COMMON
from tests.test_cli import one_line_error, run
from tests.test_decoder import _decode_logits

WINDOW = 64
ATOL = 1e-4
# Random-weight decoders attending through a window of 64: Mistral in every layer, Qwen2 above
# max_window_layers, Gemma-3 in alternating local/global layers.
CONFIGS = {
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(**{**COMMON, "num_hidden_layers": 3}, num_key_value_heads=2,
                                              use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=16,
                                                    sliding_window=WINDOW,
                                                    layer_types=["sliding_attention", "full_attention"]),
}
CLASSES = {"mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "gemma3": transformers.Gemma3ForCausalLM}


def _model(arch: str):
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config.architectures = [CLASSES[arch].__name__]
    return CLASSES[arch](config).eval()


@pytest.fixture(scope="module")
def windowed_dir(tmp_path_factory):
    made = {}

    def make(arch: str):
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp(f"windowed_{arch}")
            _model(arch).save_pretrained(made[arch])
        return made[arch]

    return make


def _windowed_layers(arch: str) -> int:
    config = CONFIGS[arch]()
    kinds = getattr(config, "layer_types", None)
    return config.num_hidden_layers if kinds is None else sum(k == "sliding_attention" for k in kinds)


def _compile(model_dir, out, target, task=None):
    report = effc.compile(str(model_dir), out, target=target, passes=["sparse_attention"],
                          **({"task": task} if task else {}))
    record = next(p for p in report.passes if p.name == "sparse_attention")
    return record


def _check_counts(arch, record):
    layers = CONFIGS[arch]().num_hidden_layers
    assert record.counts["rewritten"] == _windowed_layers(arch)
    dense = sum(v for k, v in record.counts.items() if k.startswith("left dense"))
    assert dense == layers - _windowed_layers(arch)
    if dense:
        assert record.counts["left dense: a global (dense) layer"] == dense


CASES = [("mistral", "onnx"), ("gemma3", "ort"), ("qwen2", "ort"), ("mistral", "torch"),
         *[pytest.param(a, t, marks=pytest.mark.slow) for a, t in
           [("mistral", "ort"), ("qwen2", "onnx"), ("gemma3", "onnx"), ("qwen2", "torch"),
            ("gemma3", "torch")]]]


@pytest.mark.parametrize("arch,target", CASES)
def test_exact_prefill_without_cache_matches_eager(arch, target, windowed_dir, tmp_path):
    """--task text-generation: one forward over 3x the window, a left-padded batch of 2."""
    record = _compile(windowed_dir(arch), tmp_path / "art", target, task="text-generation")
    _check_counts(arch, record)
    model = _model(arch)
    ids = torch.randint(3, 512, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    with open_artifact(tmp_path / "art") as session:
        got = session.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["logits"]
    keep = mask.numpy().astype(bool)
    err = float(np.abs(got - want)[keep].max())
    assert err <= ATOL, f"{arch} {target}: max |Δ| {err:.3g} over the unpadded positions"


@pytest.mark.parametrize("arch,target", CASES)
def test_exact_decode_with_cache_matches_full_forward(arch, target, windowed_dir, tmp_path):
    """The default task: a prefill of 2.3x the window, then 40 cached steps to 3x; each step's logits
    against a no-cache forward of eager transformers over the same tokens."""
    record = _compile(windowed_dir(arch), tmp_path / "art", target)
    _check_counts(arch, record)
    model = _model(arch)
    ids = np.random.default_rng(0).integers(3, 512, (1, 150))
    with open_artifact(tmp_path / "art") as session:
        got, tokens = _decode_logits(session, ids, 40)
    with torch.no_grad():
        full = model(torch.as_tensor(tokens), use_cache=False).logits.numpy()
    for step, logits in enumerate(got):
        err = float(np.abs(logits - full[:, 149 + step]).max())
        assert err <= ATOL, f"{arch} {target}: step {step} max |Δ| {err:.3g}"


def test_generate_through_the_window_equals_transformers(windowed_dir, tmp_path):
    """Session.generate on the rewritten Mistral, whose cache keeps only the window, = transformers greedy."""
    _compile(windowed_dir("mistral"), tmp_path / "art", "ort")
    model = _model("mistral")
    prompt = np.random.default_rng(2).integers(3, 512, 100).tolist()
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False, min_new_tokens=60,
                              pad_token_id=0)[0, 100:].tolist()
    with open_artifact(tmp_path / "art") as session:
        got = session.generate([prompt], max_new_tokens=60, eos_token_id=[]).tokens[0]
    assert got == want


def test_approximate_longformer_on_minilm_reports_accuracy_and_debugs(minilm_dir, tmp_path):
    """all-MiniLM-L6-v2 with a window of 64 and global token 0 ([CLS]): compiles, states its accuracy against
    eager and the length from which it pays, and `effc debug` ranks its layers."""
    out = tmp_path / "art"
    report = effc.compile(str(minilm_dir), out, target="ort", passes=["sparse_attention"],
                          pass_config=["sparse_attention.pattern=longformer", "sparse_attention.window=64",
                                       "sparse_attention.global_tokens=0"], input_shapes={"input_ids": (2, 200)})
    record = report.passes[-1]
    assert record.counts["rewritten"] == 6
    assert any("pays from about S =" in n for n in record.notes)
    accuracy = report.accuracy_vs_eager
    assert accuracy is not None and 0.5 < accuracy["outputs"][0]["cosine"] < 1.0  # changed, and still close
    ids = np.random.default_rng(0).integers(1000, 20000, (2, 200)).astype(np.int64)
    data = tmp_path / "batch.npz"
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    result = run("debug", minilm_dir, out, "--data", data, "--json", tmp_path / "debug.json")
    assert result.exit_code == 0, result.output
    ranked = [row["name"] for row in json.loads((tmp_path / "debug.json").read_text())["ranked"]]
    assert {f"encoder.layer.{i}.attention.self" for i in range(6)} <= set(ranked)  # each rewritten attention
    assert "To keep them dense: --pass-config sparse_attention.layers=" in result.output


def test_approximate_window_on_llama(hf_dir, tmp_path):
    report = effc.compile(str(hf_dir("llama")), tmp_path / "art", target="onnx", passes=["sparse_attention"],
                          pass_config=["sparse_attention.pattern=dilated", "sparse_attention.window=8",
                                       "sparse_attention.dilation=2"])
    assert report.passes[-1].counts["rewritten"] == 2
    assert report.accuracy_vs_eager is not None


@pytest.mark.parametrize("pattern", ["bigbird", "blockwise"])
def test_block_patterns_compile_with_their_layout(pattern, hf_dir, tmp_path):
    """Block layouts (BigBird: neighbours, random blocks, a global first block; blockwise: its own block)
    compile and verify; the layout the op reads is the one the pattern defines."""
    report = effc.compile(str(hf_dir("llama")), tmp_path / "art", target="onnx", passes=["sparse_attention"],
                          task="text-generation", pass_config=[f"sparse_attention.pattern={pattern}",
                                                               "sparse_attention.block=16"])
    assert report.passes[-1].counts["rewritten"] == 2
    assert report.verification["passed"] and report.accuracy_vs_eager is not None
    from effc.passes.sparse_attention import SparseAttention, SparseAttentionConfig

    _, causal, _, globals_, block, layout = SparseAttention(SparseAttentionConfig(pattern=pattern, block=16))._pattern(
        True, 256)
    assert block == 16 and layout.shape == (16, 16) and causal
    diagonal = layout.diagonal().all() and not layout[0, 5]
    assert diagonal if pattern == "bigbird" else torch.equal(layout, torch.eye(16, dtype=torch.bool))
    assert globals_ == (list(range(16)) if pattern == "bigbird" else [])
    if pattern == "bigbird":  # neighbours and 2 random blocks per row, reproducible from the seed
        assert ((layout.sum(1) >= 3) & (layout.sum(1) <= 5)).all()


def test_no_window_is_a_note_not_an_error(hf_dir, tmp_path):
    report = effc.compile(str(hf_dir("llama")), tmp_path / "art", target="onnx", passes=["sparse_attention"])
    assert report.passes[-1].counts["rewritten"] == 0
    assert any("nothing to rewrite" in n for n in report.passes[-1].notes)


@pytest.mark.parametrize("arch,config,needle", [
    ("llama", ["sparse_attention.pattern=exact"], "no windowed attention"),
    ("llama", ["sparse_attention.pattern=window", "sparse_attention.window=0"], "window=0"),
    ("llama", ["sparse_attention.pattern=dilated", "sparse_attention.window=64", "sparse_attention.dilation=3"],
     "does not divide"),
    ("llama", ["sparse_attention.pattern=longformer", "sparse_attention.window=8",
               "sparse_attention.global_tokens=999"], "out of range"),
    ("mistral", ["sparse_attention.pattern=longformer", "sparse_attention.window=32",
                 "sparse_attention.global_tokens=0"], "KV cache keeps"),
])
def test_bad_settings_are_one_line_exit_2(arch, config, needle, hf_dir, tmp_path):
    args = ["compile", hf_dir(arch), "--passes", "sparse_attention", "--target", "onnx", "-o", tmp_path / "out"]
    for item in config:
        args += ["--pass-config", item]
    one_line_error(run(*args), needle)
    assert not (tmp_path / "out").exists()

"""merge_lora against peft's own merge_and_unload (the reference), on real architectures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

import effc
from effc.inputs import make_text_inputs
from effc.runtime import open as open_artifact
from examples.models import build

SHAPES = [(1, 9), (3, 40)]
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def make_adapter(arch: str, path, seed: int, **config):
    """An adapter with non-trivial weights (peft starts B, DoRA magnitudes and IA3 vectors at no-ops)."""
    model = build(arch)
    cls = IA3Config if config.pop("ia3", False) else LoraConfig
    if cls is LoraConfig:
        config.setdefault("target_modules", LORA_TARGETS[arch])
        config.setdefault("r", 4)
        config.setdefault("lora_alpha", 8)
        config.setdefault("fan_in_fan_out", arch == "gpt2")
    peft_model = get_peft_model(model, cls(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name or "ia3_l" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(path)
    return path


def reference(base_dir, adapter_dirs, weights=None):
    """peft's merged model: merge_and_unload (a weighted 'cat' combination for several adapters)."""
    from effc.sources import load

    base = load(str(base_dir)).model
    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    if len(adapter_dirs) > 1:
        names = [f"a{i}" for i in range(len(adapter_dirs))]
        model.add_weighted_adapter(names, list(weights), "combined", combination_type="cat")
        model.set_adapter("combined")
    return model.merge_and_unload().eval()


def check_against(reference_model, artifact, config, atol=1e-4):
    worst = 0.0
    with open_artifact(artifact) as session:
        names = [i.name for i in session.input_metadata()]
        out = session.output_metadata()[0].name
        for i, shape in enumerate(SHAPES):
            feeds = make_text_inputs(names, config, shape, seed=10 + i)
            with torch.no_grad():
                ref = reference_model(**feeds, use_cache=False)[out].numpy()
            got = session.run({k: v.numpy() for k, v in feeds.items()})[out]
            worst = max(worst, float(np.abs(got - ref).max()))
    assert worst <= atol, f"max |Δ| {worst:.3g} vs peft merge_and_unload"
    print(f"{artifact.name}: max |Δ| {worst:.3g} vs peft merge_and_unload over shapes {SHAPES}")
    return worst


def lora_layers(adapter_dir) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return sum(1 for k in f.keys() if ".lora_A." in k)


def merged_report(report):
    (merge,) = [p for p in report.passes if p.name == "merge_lora"]
    return merge


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_lora_matches_peft_merge(arch, hf_dir, tmp_path):
    base_dir = hf_dir(arch)
    adapter = make_adapter(arch, tmp_path / "lora", seed=1)
    report = effc.compile(str(base_dir), tmp_path / "merged", adapters=[str(adapter)], passes=["merge_lora"],
                          target="onnx")
    base = effc.compile(str(base_dir), tmp_path / "base", passes=["cleanup"], target="onnx")
    merge = merged_report(report)
    assert merge.counts["LoRA layers merged"] == lora_layers(adapter)
    assert "layers left unmerged" not in merge.counts
    check_against(reference(base_dir, [adapter]), tmp_path / "merged", build(arch).config)
    # structurally the base model again: no LoRA nodes, same ONNX node count, same parameter bytes
    merged_onnx = onnx.load(tmp_path / "merged" / "model.onnx")
    base_onnx = onnx.load(tmp_path / "base" / "model.onnx")
    if arch == "gpt2":  # Conv1D's view-addmm-view becomes one linear: fewer nodes than the base
        assert len(merged_onnx.graph.node) < len(base_onnx.graph.node)
    else:
        assert len(merged_onnx.graph.node) == len(base_onnx.graph.node)
    assert not [i.name for i in merged_onnx.graph.initializer if "lora" in i.name.lower()]
    assert merge.param_bytes_after == base.passes[0].param_bytes_after  # both also drop an unused buffer


@pytest.mark.parametrize("variant, config", [
    ("rslora", {"use_rslora": True}),
    ("dora", {"use_dora": True}),
    ("ia3", {"ia3": True, "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
])
def test_variants_match_peft_merge(variant, config, hf_dir, tmp_path):
    base_dir = hf_dir("llama")
    adapter = make_adapter("llama", tmp_path / variant, seed=2, **config)
    report = effc.compile(str(base_dir), tmp_path / "merged", adapters=[str(adapter)], passes=["merge_lora"],
                          target="onnx")
    merge = merged_report(report)
    kind = {"rslora": "LoRA", "dora": "DoRA", "ia3": "IA3"}[variant]
    assert merge.counts[f"{kind} layers merged"] > 0 and "layers left unmerged" not in merge.counts
    base = effc.compile(str(base_dir), tmp_path / "base", passes=["cleanup"], target="onnx")
    assert merge.param_bytes_after == base.passes[0].param_bytes_after  # both also drop an unused buffer
    check_against(reference(base_dir, [adapter]), tmp_path / "merged", build("llama").config)


def test_two_adapters_weighted(hf_dir, tmp_path):
    base_dir = hf_dir("llama")
    a = make_adapter("llama", tmp_path / "a", seed=3)
    b = make_adapter("llama", tmp_path / "b", seed=4, r=8, lora_alpha=4)
    effc.compile(str(base_dir), tmp_path / "merged", adapters=[str(a), str(b)], passes=["merge_lora"],
                 pass_config=["merge_lora.weights=0.7,0.3"], target="ort")
    check_against(reference(base_dir, [a, b], [0.7, 0.3]), tmp_path / "merged", build("llama").config)
    # and the weights matter: an equal-weight reference is far away
    with pytest.raises(AssertionError):
        check_against(reference(base_dir, [a, b], [0.5, 0.5]), tmp_path / "merged", build("llama").config)


def test_weights_must_match_adapters(hf_dir, tmp_path):
    from effc.errors import EffcError

    a = make_adapter("llama", tmp_path / "a", seed=3)
    with pytest.raises(EffcError, match="one weight per adapter"):
        effc.compile(str(hf_dir("llama")), tmp_path / "m", adapters=[str(a)], passes=["merge_lora"],
                     pass_config=["merge_lora.weights=0.7,0.3"])
    assert not (tmp_path / "m").exists()


def test_no_adapter_is_no_change(hf_dir, tmp_path):
    report = effc.compile(str(hf_dir("llama")), tmp_path / "m", passes=["merge_lora"], target="onnx")
    assert not merged_report(report).changed


def test_embedding_lora_is_left_unmerged_with_a_note(hf_dir, tmp_path):
    adapter = make_adapter("llama", tmp_path / "emb", seed=5, target_modules=["embed_tokens", "q_proj"])
    report = effc.compile(str(hf_dir("llama")), tmp_path / "m", adapters=[str(adapter)], passes=["merge_lora"])
    merge = merged_report(report)
    assert merge.counts["LoRA layers merged"] == 2 and merge.counts["layers left unmerged"] == 1
    assert any("embed_tokens" in n and "embedding" in n for n in merge.notes)
    check_against(reference(hf_dir("llama"), [adapter]), tmp_path / "m", build("llama").config)


@pytest.fixture(scope="module")
def three_adapters(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    return [make_adapter("llama", root / name, seed=20 + i, r=r, lora_alpha=2 * r)
            for i, (name, r) in enumerate([("chat", 4), ("code", 8), ("sql", 2)])]


def test_switchable_each_adapter_matches_its_merge(hf_dir, three_adapters, tmp_path):
    base_dir = hf_dir("llama")
    report = effc.compile(str(base_dir), tmp_path / "switch", adapters=[str(a) for a in three_adapters],
                          passes=["merge_lora"], pass_config=["merge_lora.mode=switchable"], target="ort")
    assert set(report.verification["adapters"]) == {"chat", "code", "sql"}
    merged_sizes = 0
    config = build("llama").config
    with open_artifact(tmp_path / "switch") as session:
        assert session.adapter_names() == ["chat", "code", "sql"]
        ort_session = session._session
        for adapter in three_adapters:
            ref_model = reference(base_dir, [adapter])
            feeds = make_text_inputs(["input_ids", "attention_mask"], config, (2, 21), seed=3)
            with torch.no_grad():
                ref = ref_model(**feeds, use_cache=False).logits.numpy()
            session.select_adapter(adapter.name)  # a switch: no recompile, no new session
            got = session.run({k: v.numpy() for k, v in feeds.items()})["logits"]
            assert np.abs(got - ref).max() <= 1e-4, adapter.name
            merged = effc.compile(str(base_dir), tmp_path / f"merged-{adapter.name}", adapters=[str(adapter)],
                                  passes=["merge_lora"], target="ort")
            merged_sizes += merged.artifact_bytes
        assert session._session is ort_session
    # one shared base + small weight sets (three files and the default inside model.onnx), not three bases
    set_bytes = max(p.stat().st_size for p in (tmp_path / "switch" / "adapters").iterdir())
    assert report.artifact_bytes < merged_sizes / 3 + 4 * set_bytes * 1.1
    print(f"switchable artifact {report.artifact_bytes} B vs 3 merged {merged_sizes} B "
          f"({report.artifact_bytes / merged_sizes:.3f}x)")


def test_switchable_cli_selects_adapter(hf_dir, three_adapters, tmp_path):
    from click.testing import CliRunner

    from effc.cli import main

    base_dir = hf_dir("llama")
    args = ["compile", str(base_dir), "-o", str(tmp_path / "sw"), "--passes", "merge_lora",
            "--pass-config", "merge_lora.mode=switchable"]
    for a in three_adapters:
        args += ["--adapter", str(a)]
    assert CliRunner().invoke(main, args).exit_code == 0
    np.savez(tmp_path / "in.npz", input_ids=np.arange(10).reshape(1, 10), attention_mask=np.ones((1, 10), np.int64))
    outs = []
    for name in ("chat", "sql"):
        r = CliRunner().invoke(main, ["run", str(tmp_path / "sw"), "--inputs", str(tmp_path / "in.npz"),
                                      "--adapter", name, "--save-outputs", str(tmp_path / f"{name}.npz")])
        assert r.exit_code == 0, r.output
        outs.append(np.load(tmp_path / f"{name}.npz")["logits"])
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
    bad = CliRunner().invoke(main, ["run", str(tmp_path / "sw"), "--inputs", str(tmp_path / "in.npz"), "--adapter", "nope"])
    assert bad.exit_code == 2 and "adapters: chat, code, sql" in bad.output


def test_switchable_refuses_dora(hf_dir, tmp_path):
    from effc.errors import EffcError

    dora = make_adapter("llama", tmp_path / "dora", seed=6, use_dora=True)
    with pytest.raises(EffcError, match="supports LoRA and rsLoRA"):
        effc.compile(str(hf_dir("llama")), tmp_path / "m", adapters=[str(dora)], passes=["merge_lora"],
                     pass_config=["merge_lora.mode=switchable"])
    assert not (tmp_path / "m").exists()

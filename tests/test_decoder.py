"""Decoder artifacts with their KV cache (effc.decoder): every cached decode step's logits against a full
no-cache forward of eager transformers over the same tokens, past the sliding window where the model has
one; feeds without the cache; the task rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import effc
from effc.errors import EffcError
from effc.runtime import open as open_artifact
from examples.models import DECODERS, build

ATOL = 1e-4
# Long enough to pass the sliding windows of the examples' Mistral (64) and Gemma-3 (16).
PROMPT, STEPS = 40, 30


def _decode_logits(session, ids: np.ndarray, steps: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Greedy decode through the cache with Session.run only: each step's last-position logits, and all tokens."""
    out = session.run({"input_ids": ids})  # a prefill: the empty cache and the positions are filled in
    layers = sum(1 for o in session.outputs if o.name.endswith(".key"))
    mask = np.ones_like(ids)
    tokens, logits = ids, [out["logits"][:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1)[:, None].astype(np.int64)
        tokens = np.concatenate([tokens, token], axis=1)
        mask = np.ones_like(tokens)
        feeds = {"input_ids": token, "attention_mask": mask, "position_ids": np.full_like(token, tokens.shape[1] - 1)}
        for i in range(layers):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = out[f"present.{i}.{kv}"]
        out = session.run(feeds)
        logits.append(out["logits"][:, -1])
    return logits, tokens


def _check_steps(model_dir, artifact, arch):
    model = build(arch)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, PROMPT))
    with open_artifact(artifact) as session:
        got, tokens = _decode_logits(session, ids, STEPS)
    with torch.no_grad():
        full = model(torch.as_tensor(tokens), use_cache=False).logits.numpy()  # no cache: the reference
    for step, logits in enumerate(got):
        err = float(np.abs(logits - full[:, PROMPT - 1 + step]).max())
        assert err <= ATOL, f"{arch}: decode step {step} (position {PROMPT - 1 + step}) max |Δ| {err:.3g} > {ATOL}"


@pytest.mark.parametrize("arch", [a if a in ("llama", "gpt2", "gemma3") else pytest.param(a, marks=pytest.mark.slow)
                                  for a in DECODERS])
def test_cached_steps_match_full_forward_onnx(arch, tmp_path):
    model_dir = tmp_path / "hf"
    build(arch).save_pretrained(model_dir)
    report = effc.compile(str(model_dir), tmp_path / "art", target="onnx")
    shapes = report.verification["shapes"]
    assert sum(s["input_ids"][1] == 1 for s in shapes) >= 2  # prefill plus at least two cached decode steps
    _check_steps(model_dir, tmp_path / "art", arch)


@pytest.mark.parametrize("arch", ["mistral", pytest.param("llama", marks=pytest.mark.slow), "gemma3"])
def test_cached_steps_match_full_forward_ort(arch, tmp_path):
    model_dir = tmp_path / "hf"
    build(arch).save_pretrained(model_dir)
    effc.compile(str(model_dir), tmp_path / "art", target="ort")
    _check_steps(model_dir, tmp_path / "art", arch)


def test_manifest_describes_the_cache(hf_dir, tmp_path):
    effc.compile(str(hf_dir("llama")), tmp_path / "art", target="onnx")
    with open_artifact(tmp_path / "art") as session:
        meta = session.manifest["decoder"]
        assert (meta["layers"], meta["kv_heads"], meta["head_dim"], meta["task"]) == (2, 2, 16, "text-generation-with-past")
        # effc run-style feeds: input_ids only is a prefill with an empty cache, as stock onnxruntime runs it.
        ids = np.arange(5, dtype=np.int64)[None]
        out = session.run({"input_ids": ids})
    with torch.no_grad():
        ref = build("llama")(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(out["logits"] - ref).max() <= ATOL
    assert out["present.1.value"].shape == (1, 2, 5, 16)


def test_text_generation_task_keeps_the_single_pass(hf_dir, tmp_path):
    effc.compile(str(hf_dir("llama")), tmp_path / "art", target="onnx", task="text-generation")
    with open_artifact(tmp_path / "art") as session:
        assert [i.name for i in session.inputs] == ["input_ids", "attention_mask"]
        assert "decoder" not in session.manifest


def test_with_past_task_on_an_encoder_is_refused(hf_dir, tmp_path):
    with pytest.raises(EffcError, match="needs a causal LM"):
        effc.compile(str(hf_dir("bert")), tmp_path / "art", target="onnx", task="text-generation-with-past")
    assert not (tmp_path / "art").exists()


def _reference(model, prompts: list[list[int]], new: int, pad: int) -> list[list[int]]:
    """transformers generate(do_sample=False) on the left-padded batch, eos off (every row runs `new` tokens)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=pad)
    return out[:, width:].tolist()


NEW = 64
FAST = {("llama", "onnx"), ("mistral", "ort"), ("gemma3", "ort"), ("llama", "torch")}
MATRIX = [pytest.param(a, t, marks=() if (a, t) in FAST else pytest.mark.slow)
          for t in ("onnx", "ort", "torch") for a in DECODERS]


@pytest.mark.parametrize("arch,target", MATRIX)
def test_greedy_generation_equals_transformers(arch, target, tmp_path):
    """64 greedy tokens for one prompt and for a left-padded batch of 3 prompts of different lengths, token
    for token transformers' generate in fp32."""
    model_dir = tmp_path / "hf"
    model = build(arch)
    model.save_pretrained(model_dir)
    effc.compile(str(model_dir), tmp_path / "art", target=target)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (9, 4, 14)]
    pasts = []  # the cache length each step is fed
    with open_artifact(tmp_path / "art") as session:
        run = session.run
        session.run = lambda feeds, **kw: (pasts.append(feeds["past_key_values.0.key"].shape[2]), run(feeds, **kw))[1]
        single = session.generate(prompts[0], max_new_tokens=NEW, eos_token_id=[], pad_token_id=0).tokens
        batch = session.generate(prompts, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0).tokens
        window = session.manifest["decoder"]["cache_window"]
        shared = session.shared_cache(1, 1) is not None
    assert single == _reference(model, prompts[:1], NEW, 0)
    assert batch == _reference(model, prompts, NEW, 0)
    if shared:  # ort: one buffer per cache tensor, written in place; no step feeds a cache
        assert not pasts and not window and target == "ort"
    else:  # A model windowed in every layer (Mistral) keeps only the window; others the whole sequence.
        assert max(pasts) == (window if window else max(map(len, prompts)) + NEW - 2)  # the last token is not fed


def test_switchable_adapters_generate_per_request(hf_dir, tmp_path):
    """One session, two adapters chosen per request: each output equals transformers generate on the model
    merged with that adapter (peft merge_and_unload)."""
    from tests.passes.test_merge_lora import make_adapter, reference

    base = hf_dir("llama")
    adapters = [make_adapter("llama", tmp_path / name, seed=30 + i) for i, name in enumerate(("chat", "code"))]
    effc.compile(str(base), tmp_path / "switch", adapters=[str(a) for a in adapters], passes=["merge_lora"],
                 pass_config=["merge_lora.mode=switchable"], target="ort")
    prompt = np.random.default_rng(2).integers(3, 512, 10).tolist()
    with open_artifact(tmp_path / "switch") as session:
        got = {a.name: session.generate(prompt, max_new_tokens=24, eos_token_id=[], adapter=a.name).tokens[0]
               for a in adapters}
    for a in adapters:
        assert got[a.name] == _reference(reference(base, [a]), [prompt], 24, 0)[0], a.name
    assert got["chat"] != got["code"]


@pytest.mark.parametrize("passes,config", [
    (["int8"], []), (["int4"], ["int4.int8_activations=true"]),
    (["int4"], ["int4.method=gptq", "int4.int8_activations=true"]),
    pytest.param(["int4"], ["int4.method=awq", "int4.int8_activations=true"], marks=pytest.mark.slow)])
def test_quantized_decoders_generate(passes, config, default_model, tmp_path):
    """int8 dynamic and int4 (rtn, and gptq/awq calibrated on real text through the decoder's prefill) with
    int8 activations in decoder artifacts: verified with the cache, their accuracy against eager reported
    (top-1 of the logits, measured on the artifact), and generating."""
    calib = {}
    if any("gptq" in c or "awq" in c for c in config):
        from examples.text import speeches

        (tmp_path / "calib.txt").write_text("\n".join(speeches("comedies/as-you-like-it", limit=32)))
        calib = {"calib_data": str(tmp_path / "calib.txt"), "calib_samples": 32}
    report = effc.compile(str(default_model[0]), tmp_path / "q", passes=passes, pass_config=config, target="ort",
                          **calib)
    assert report.verification["passed"] and sum(s["input_ids"][1] == 1 for s in report.verification["shapes"]) >= 2
    logits = next(o for o in report.accuracy_vs_eager["outputs"] if o["name"] == "logits")
    assert logits["top1_agreement"] >= 0.6, logits
    with open_artifact(tmp_path / "q") as session:
        assert len(session.generate("To be, or not", max_new_tokens=16, eos_token_id=[]).tokens[0]) == 16


def test_generate_refuses_artifacts_without_a_cache(hf_dir, tmp_path):
    """An encoder, and a causal LM compiled as one forward: one line, exit 2."""
    from click.testing import CliRunner

    from effc.cli import main

    effc.compile(str(hf_dir("bert")), tmp_path / "enc", target="onnx")
    effc.compile(str(hf_dir("llama")), tmp_path / "single", target="onnx", task="text-generation")
    for art, what in ((tmp_path / "enc", "an encoder"), (tmp_path / "single", "a decoder without its KV cache")):
        r = CliRunner().invoke(main, ["generate", str(art), "--prompt-ids", "1,2,3"])
        assert r.exit_code == 2 and what in r.output and len(r.output.strip().splitlines()) == 1, r.output

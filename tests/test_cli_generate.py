"""`effc generate` on the embedded default model (it has a tokenizer): text equal to transformers generate's,
--json, --stream, --stop, --prompt-ids; bad requests exit 2 with one line and write nothing."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import effc
from effc.cli import main

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, default_model):
    out = tmp_path_factory.mktemp("gen_cli") / "art"
    effc.compile(str(default_model[0]), out, target="onnx")
    return out


def _cli(*args):
    return CliRunner().invoke(main, ["generate", *map(str, args)])


def _files(path):
    return sorted((p.relative_to(path), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_text_matches_transformers(artifact, default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model[0])
    model = AutoModelForCausalLM.from_pretrained(default_model[0], torch_dtype=torch.float32).eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**enc, do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id or 0)
    want = ref[0, enc["input_ids"].shape[1]:].tolist()
    res = _cli(artifact, "--prompt", PROMPT, "--max-new-tokens", 24, "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    end = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
    assert got["tokens"][0] == want[:end]
    assert got["text"][0] == tok.decode(want[:end], skip_special_tokens=True)
    plain = _cli(artifact, "--prompt", PROMPT, "--max-new-tokens", 24)
    assert plain.exit_code == 0 and got["text"][0] in plain.output and "tokens/s" in plain.output


def test_stream_and_stop(artifact):
    full = json.loads(_cli(artifact, "--prompt", PROMPT, "--max-new-tokens", 16, "--json").output)
    text = full["text"][0]
    streamed = _cli(artifact, "--prompt", PROMPT, "--max-new-tokens", 16, "--stream")
    assert streamed.exit_code == 0 and text in streamed.output
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("the generated text has no usable stop string")
    cut = json.loads(_cli(artifact, "--prompt", PROMPT, "--max-new-tokens", 16, "--stop", stop, "--json").output)
    assert cut["text"][0] == text[:text.find(stop)] and cut["stopped"] == ["stop"]


def test_prompt_ids(artifact):
    res = _cli(artifact, "--prompt-ids", "5,6,7", "--prompt-ids", "8,9", "--max-new-tokens", 4, "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["tokens"]) == 2


@pytest.mark.parametrize("args, words", [
    (["--max-new-tokens", 0], "1 or more"),
    (["--max-new-tokens", 100000], "context"),
    (["--adapter", "nope"], "no adapter"),
    (["--prompt-ids", "1,x"], "comma-separated"),
])
def test_bad_requests_exit_2(artifact, args, words):
    before = _files(artifact)
    prompt = [] if "--prompt-ids" in args else ["--prompt", PROMPT]
    res = _cli(artifact, *prompt, *args)
    assert res.exit_code == 2, res.output
    assert words in res.output and len(res.output.strip().splitlines()) == 1
    assert _files(artifact) == before


def test_bench_generate(artifact):
    res = CliRunner().invoke(main, ["bench", str(artifact), "--generate", "--new-tokens", "4", "--seq", "8",
                                    "--iters", "2", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    for engine in ("artifact", "eager"):  # the source directory (examples/default) is readable here
        assert got[engine]["prefill_ms"] > 0 and got[engine]["decode_tokens_per_s"] > 0
    assert got["generate"] == {"batch": 1, "prompt_tokens": 8, "new_tokens": 4} and got["threads"] == 2

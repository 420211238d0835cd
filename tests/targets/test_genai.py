"""onnxruntime-genai runs an effc decoder artifact through its genai_config.json (targets/genai_config.py):
og.Model loads it, its tokenizer reads the artifact's tokenizer.json, and its greedy tokens equal
transformers generate (fp32, exact token for token) and effc's Session.generate, for one prompt and a
batch. The batch's prompts have one length: onnxruntime-genai 0.18's append_tokens attends to pad tokens
(its attention mask is all ones; measured: the left-padded row's logits 0.76 off effc's masked ones), so a
left-padded batch is not the same computation as transformers'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import effc
from effc.targets import genai_config

og = pytest.importorskip("onnxruntime_genai", reason="pip install onnxruntime-genai (the test extra)")

DEFAULT = Path(__file__).resolve().parents[2] / "examples" / "default" / "model"  # a Llama with a tokenizer
NEW = 24
PROMPTS = [[1, 5, 17, 9, 33, 101, 7], [1, 44, 12, 300, 8, 19, 250]]
INFO = {"layers": 2, "kv_heads": 2, "heads": 4, "head_dim": 16, "hidden_size": 64, "vocab_size": 512,
        "max_positions": 256, "eos_token_id": [2], "pad_token_id": None, "bos_token_id": 1}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("genai") / "art"
    effc.compile(str(DEFAULT), out, target="ort")
    return out


@pytest.fixture(scope="module")
def artifact(compiled) -> Path:
    """The artifact as compiled: the pipeline writes genai_config.json for onnx/ort decoders."""
    assert json.loads((compiled / genai_config.FILE).read_text())["model"]["decoder"]["filename"] == "model.onnx"
    return compiled


@pytest.fixture(scope="module")
def reference():
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(DEFAULT, dtype=torch.float32).eval()


def _transformers(model, rows: list[list[int]], pad: int) -> list[list[int]]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=pad)
    return [_until_eos(r) for r in out[:, width:].tolist()]


def _until_eos(row: list[int], eos: int = 2) -> list[int]:
    return row[:row.index(eos) + 1] if eos in row else row


def _genai(path: Path, rows: list[list[int]], pad: int) -> list[list[int]]:
    """Batched greedy search in onnxruntime-genai: it left-pads the batch with pad_token_id itself."""
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    width = max(map(len, rows))
    params.set_search_options(max_length=width + NEW, do_sample=False, batch_size=len(rows))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([[pad] * (width - len(r)) + r for r in rows], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [_until_eos([int(t) for t in generator.get_sequence(i)[width:]]) for i in range(len(rows))]


def test_config_names_the_contract():
    doc = genai_config.config(INFO)
    dec = doc["model"]["decoder"]
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["num_attention_heads"], dec["head_size"]) \
        == (2, 2, 4, 16)
    assert dec["session_options"]["session.intra_op.allow_spinning"] == "0"
    assert doc["model"]["eos_token_id"] == 2 and doc["model"]["pad_token_id"] == 2  # no pad id: eos pads
    assert doc["search"]["past_present_share_buffer"] is False and doc["search"]["max_length"] == 256


def test_one_prompt_equals_transformers(artifact, reference):
    expected = _transformers(reference, PROMPTS[:1], pad=0)
    assert _genai(artifact, PROMPTS[:1], pad=2) == expected
    assert len(expected[0]) > 4  # the comparison covers decode steps, not just the prefill


def test_batch_equals_transformers(artifact, reference):
    assert _genai(artifact, PROMPTS, pad=2) == _transformers(reference, PROMPTS, pad=2)


def test_tokenizer_from_the_artifact_root(artifact):
    tokenizers = pytest.importorskip("tokenizers")
    text = "the quick brown fox"
    ours = tokenizers.Tokenizer.from_file(str(artifact / "tokenizer.json")).encode(text).ids
    theirs = og.Tokenizer(og.Model(str(artifact))).encode(text).tolist()
    assert theirs[-len(ours):] == ours  # genai may prepend bos from tokenizer_config


def test_equals_effc_generate(compiled, artifact):
    import effc.runtime

    session = effc.runtime.open(compiled)
    if not hasattr(session, "generate"):
        pytest.skip("Session.generate has not landed")
    ours = session.generate(PROMPTS, max_new_tokens=NEW, pad_token_id=2).tokens
    assert [_until_eos(r) for r in ours] == _genai(artifact, PROMPTS, pad=2)

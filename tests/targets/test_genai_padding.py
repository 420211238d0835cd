"""onnxruntime-genai batches prompts of unequal lengths on effc's decoder artifacts, token-equal to
transformers' greedy generate of each prompt alone.

onnxruntime-genai 0.18 pads a batch on the right (og.Tokenizer.encode_batch) and masks only trailing pad
tokens: a left-padded batch appended by hand gets an attention mask of all ones, so its padded rows attend
to the padding (test_left_padding_is_not_masked pins that, so a change in og shows here). Right padding
leaves holes in the mask on every decode step (real tokens, pads, then the new token), which effc's graphs
must honour: the onnx target's SDPA with a padding mask, and the ort target's GroupQueryAttention with its
attention_bias. fp32 greedy, so tokens must be equal, compared up to each row's first EOS.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install "
                         "onnxruntime-genai==0.18.0, the test extra)")

import effc  # noqa: E402
from effc.targets import genai_config  # noqa: E402

# 7, 2 and 18 tokens with examples/default's tokenizer: the short row is padded for 16 positions.
PROMPTS = ["The quick brown fox", "Hi", "Once upon a time, in a land far away, there lived"]
NEW = 24
EOS = 2  # examples/default: eos 2, no pad id, so genai_config pads with eos


def _until_eos(row: list[int]) -> list[int]:
    return row[:row.index(EOS) + 1] if EOS in row else row


def _artifact(model_dir: Path, tmp: Path, target: str) -> Path:
    """A compiled decoder: the pipeline writes genai_config.json beside model.onnx."""
    out = tmp / target
    effc.compile(str(model_dir), out, target=target, verify=False)
    assert (out / genai_config.FILE).is_file()
    return out


def _genai(root: Path) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt's ids and its new tokens from one batched greedy search."""
    model = og.Model(str(root))
    tok = og.Tokenizer(model)
    rows = [[int(t) for t in tok.encode(p)] for p in PROMPTS]
    width = max(map(len, rows))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + NEW, do_sample=False, batch_size=len(rows))
    gen = og.Generator(model, params)
    gen.append_tokens(tok.encode_batch(PROMPTS))  # right-padded to `width`
    while not gen.is_done():
        gen.generate_next_token()
    return rows, [_until_eos([int(t) for t in gen.get_sequence(b)[width:]]) for b in range(len(rows))]


def _transformers(model_dir: Path, rows: list[list[int]]) -> list[list[int]]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [_until_eos(model.generate(torch.tensor([r]), do_sample=False, max_new_tokens=NEW,
                                          pad_token_id=EOS)[0, len(r):].tolist()) for r in rows]


@pytest.mark.parametrize("target", ["ort", pytest.param("onnx", marks=pytest.mark.slow)])
def test_unequal_prompts_equal_transformers(target, default_model, tmp_path):
    model_dir, _ = default_model
    rows, got = _genai(_artifact(model_dir, tmp_path, target))
    assert sorted(map(len, rows)) == [2, 7, 18]  # the batch really is padded
    want = _transformers(model_dir, rows)
    assert min(map(len, want)) > 4  # decode steps are compared, not just the prefill's token
    assert got == want


def test_left_padding_is_not_masked(default_model, tmp_path):
    """og 0.18 builds the prefill's mask from trailing pad tokens only (needs no compiled model: the
    mask is read back before any step runs)."""
    model_dir, _ = default_model
    root = tmp_path / "genai"
    root.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(model_dir / name, root / name)
    decoder = {"layers": 1, "kv_heads": 1, "heads": 1, "head_dim": 4, "hidden_size": 4, "vocab_size": 1024,
               "max_positions": 64, "eos_token_id": [EOS], "pad_token_id": None, "bos_token_id": 1}
    genai_config.write(root, decoder, model_file="model.onnx")
    _identity_decoder(root / "model.onnx", decoder)
    model = og.Model(str(root))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=16, batch_size=2)
    for ids, mask in (([[EOS, EOS, 1, 5], [1, 5, 6, 7]], [[1, 1, 1, 1], [1, 1, 1, 1]]),
                      ([[1, 5, EOS, EOS], [1, 5, 6, 7]], [[1, 1, 0, 0], [1, 1, 1, 1]])):
        gen = og.Generator(model, params)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        assert np.asarray(gen.get_input("attention_mask")).tolist() == mask


def _identity_decoder(path: Path, d: dict) -> None:
    """The smallest model with effc's decoder contract: zero logits, present = past + zeros."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    dims = ["batch", d["kv_heads"], "past", d["head_dim"]]
    ins = [h.make_tensor_value_info(n, T.INT64, ["batch", "sequence"]) for n in ("input_ids", "position_ids")]
    ins.append(h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "total"]))
    outs = [h.make_tensor_value_info("logits", T.FLOAT, ["batch", "sequence", d["vocab_size"]])]
    inits = [h.make_tensor(n, T.INT64, [1], [d[k]]) for n, k in (("vocab", "vocab_size"), ("kv", "kv_heads"),
                                                                   ("hd", "head_dim"))]
    zeros = h.make_tensor("v", T.FLOAT, [1], [0.0])
    nodes = [h.make_node("Shape", ["input_ids"], ["bs"]),
             h.make_node("Concat", ["bs", "vocab"], ["logits_shape"], axis=0),
             h.make_node("ConstantOfShape", ["logits_shape"], ["logits"], value=zeros),
             h.make_node("Split", ["bs"], ["b", "s"], axis=0, num_outputs=2),
             h.make_node("Concat", ["b", "kv", "s", "hd"], ["new_shape"], axis=0),
             h.make_node("ConstantOfShape", ["new_shape"], ["new"], value=zeros)]
    for i in range(d["layers"]):
        for kv in ("key", "value"):
            ins.append(h.make_tensor_value_info(f"past_key_values.{i}.{kv}", T.FLOAT, dims))
            outs.append(h.make_tensor_value_info(f"present.{i}.{kv}", T.FLOAT, ["batch", d["kv_heads"], "all",
                                                                                d["head_dim"]]))
            nodes.append(h.make_node("Concat", [f"past_key_values.{i}.{kv}", "new"], [f"present.{i}.{kv}"], axis=2))
    model = h.make_model(h.make_graph(nodes, "decoder", ins, outs, inits), opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)

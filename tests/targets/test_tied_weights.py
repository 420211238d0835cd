"""targets/tied_weights.py: a decoder whose LM head is tied to its embedding keeps one [vocab, hidden] table
in onnx and ort artifacts (the LM head a Gemm with transB on the embedding's table, where the exporter's
Transpose would be folded into a second copy), and computes what eager does. Tables below 1M elements are
left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers

import effc
from effc.runtime import open as open_artifact

ATOL = 1e-4


def _llama(vocab: int, hidden: int, tied: bool = True):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=tied)
    config.architectures = ["LlamaForCausalLM"]
    return transformers.LlamaForCausalLM(config).eval()


def _tables(path, shape) -> list[str]:
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    return [t.name for t in graph.initializer if sorted(t.dims) == sorted(shape)]


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_tied_table_stored_once_and_exact(target, tmp_path):
    model = _llama(8192, 128)
    model.save_pretrained(tmp_path / "hf")
    effc.compile(str(tmp_path / "hf"), tmp_path / "art", target=target)
    assert len(_tables(tmp_path / "art", (8192, 128))) == 1
    graph = onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False).graph
    gemm = [n for n in graph.node if n.op_type == "Gemm"]
    assert len(gemm) == 1 and gemm[0].input[1] == _tables(tmp_path / "art", (8192, 128))[0]
    ids = np.random.default_rng(0).integers(0, 8192, (2, 7)).astype(np.int64)
    with open_artifact(tmp_path / "art") as session:
        got = session.run({"input_ids": ids})["logits"]
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).logits.numpy()
    assert float(np.abs(got - want).max()) <= ATOL


def test_untied_and_small_tables_keep_their_matmul(tmp_path):
    for name, model in (("untied", _llama(8192, 128, tied=False)), ("small", _llama(512, 64))):
        model.save_pretrained(tmp_path / name)
        effc.compile(str(tmp_path / name), tmp_path / f"{name}-art", target="ort")
        graph = onnx.load(str(tmp_path / f"{name}-art" / "model.onnx"), load_external_data=False).graph
        assert not any(n.op_type == "Gemm" for n in graph.node), name

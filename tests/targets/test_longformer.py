"""Longformer (issue 14, the seeds' efficient-attention model) from a config with random weights: its own
sliding-window attention captures as effc::window_attention (compiler/exportable_attention.py), compiles
and matches HF's eager Longformer past its window, with padding, on each target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import effc
from effc.runtime import open as open_artifact

WINDOW = 32  # attention_window: 16 keys on each side


def _model():
    torch.manual_seed(0)
    config = transformers.LongformerConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=520,
                                           attention_window=WINDOW)
    config.architectures = ["LongformerModel"]
    return transformers.LongformerModel(config).eval()


@pytest.fixture(scope="module")
def longformer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("longformer")
    _model().save_pretrained(path)
    return path


@pytest.mark.parametrize("target", ["onnx", "ort", pytest.param("torch", marks=pytest.mark.slow)])
def test_longformer_matches_its_eager_attention(longformer_dir, target, tmp_path):
    effc.compile(str(longformer_dir), tmp_path / "art", target=target, input_shapes={"input_ids": (2, 96)})
    ids = torch.randint(3, 512, (2, 150), generator=torch.Generator().manual_seed(1))  # not a window multiple
    mask = torch.ones_like(ids)
    mask[1, 110:] = 0
    with torch.no_grad():
        want = _model()(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    with open_artifact(tmp_path / "art") as session:
        got = session.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                           "token_type_ids": np.zeros_like(ids.numpy())})
    keep = mask.numpy().astype(bool)
    err = float(np.abs(got["last_hidden_state"] - want)[keep].max())
    assert err <= 1e-4, f"{target}: max |Δ| {err:.3g} over unpadded positions"


def test_capture_uses_the_window_op_and_leaves_eager_alone(longformer_dir):
    from effc import capture, sources

    src = sources.load(str(longformer_dir))
    captured = capture.capture_source(src, capture.source_example(src))
    calls = [n for n in captured.program.graph.nodes if n.target == torch.ops.effc.window_attention.default]
    assert len(calls) == 2 and all(n.args[4] == WINDOW // 2 + 1 and n.args[5] is False for n in calls)
    # the swap lasted only for the export: the eager model runs HF's own chunked attention again
    assert "forward" not in vars(src.model.encoder.layer[0].attention.self)

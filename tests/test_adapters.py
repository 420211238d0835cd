"""PEFT adapters applied on a base: the artifact computes what peft's own model computes."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from peft import PeftModel

import effc
from effc.inputs import make_text_inputs
from effc.runtime import open as open_artifact
from effc.sources import load
from examples.make_default import make


def test_default_adapter_matches_peft(default_model, tmp_path):
    model_dir, adapter_dir = default_model
    effc.compile(str(model_dir), tmp_path / "art", adapters=[str(adapter_dir)], target="ort")
    base = load(str(model_dir))
    config = base.config
    peft_model = PeftModel.from_pretrained(load(str(model_dir)).model, str(adapter_dir)).eval()
    feeds = make_text_inputs(["input_ids", "attention_mask"], config, (3, 40), seed=5)
    with torch.no_grad():
        ref = peft_model(**feeds, use_cache=False).logits.numpy()
        plain = base.model(**feeds, use_cache=False).logits.numpy()
    with open_artifact(tmp_path / "art") as session:
        got = session.run({k: v.numpy() for k, v in feeds.items()})["logits"]
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(plain - ref).max() > 1e-2, "the adapter must change the outputs, or this test proves nothing"


def test_two_adapters_are_both_active(default_model, tmp_path):
    model_dir, adapter_dir = default_model
    src = load(str(model_dir), [str(adapter_dir), str(adapter_dir)])
    assert [a["name"] for a in src.adapters] == ["adapter", "adapter_1"]  # named by directory, made unique
    feeds = make_text_inputs(["input_ids"], src.config, (1, 8))
    single = load(str(model_dir), [str(adapter_dir)])
    base = load(str(model_dir))
    with torch.no_grad():
        two = src.model(**feeds, use_cache=False).logits
        one = single.model(**feeds, use_cache=False).logits
        zero = base.model(**feeds, use_cache=False).logits
    # a LoRA delta is linear in B: two copies of the same adapter move the logits about twice as far
    ratio = (two - zero).norm() / (one - zero).norm()
    assert 1.6 < float(ratio) < 2.4


def test_default_model_is_deterministic(default_model, tmp_path):
    make(tmp_path)
    for sub, name in (("model", "model.safetensors"), ("model", "tokenizer.json"), ("adapter", "adapter_model.safetensors")):
        committed = hashlib.sha256((default_model[0].parent / sub / name).read_bytes()).hexdigest()
        rebuilt = hashlib.sha256((tmp_path / sub / name).read_bytes()).hexdigest()
        assert committed == rebuilt, f"examples/default/{sub}/{name} differs from what make_default.py builds"

"""The layer-wise debugger: it names a planted bad layer, and its per-layer numbers agree with a direct
computation from the float model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import effc
from effc.cli import main
from effc.debug import debug
from tests.artifacts import rewrite_manifest_hashes

PLANTED = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="module")
def int8_artifact(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("debug") / "int8"
    effc.compile(str(default_model[0]), out, target="ort", passes=["int8"])
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (12, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[3, 12:] = 0  # one padded row: its padding positions are left out of every statistic
    path = tmp_path_factory.mktemp("data") / "batch.npz"
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path


def test_names_planted_bad_layer(default_model, int8_artifact, data, tmp_path):
    """One layer's weight scale made 3x too large (its weights dequantize 3x too big): ranked worst, and
    the error first jumps there; the plot and the JSON report are written."""
    bad = tmp_path / "bad"
    shutil.copytree(int8_artifact, bad)
    model = onnx.load(bad / "model.onnx")
    scale = next(t for t in model.graph.initializer if t.name == f"{PLANTED}.weight_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 3, scale.name))
    onnx.save(model, bad / "model.onnx")
    rewrite_manifest_hashes(bad)
    result = CliRunner().invoke(main, ["debug", str(default_model[0]), str(bad), "--data", str(data),
                                       "--plot", str(tmp_path / "layers.png"), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ranked"][0]["name"] == PLANTED
    assert report["first_jump"] == PLANTED
    assert report["ranked"][0]["layer_sqnr_db"] < report["ranked"][1]["layer_sqnr_db"] - 20
    assert f"int8.exclude={PLANTED}" in result.output
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the clean artifact does not single that layer out
    clean = debug(str(default_model[0]), int8_artifact, str(data))
    assert clean.ranked()[0].name != PLANTED
    assert clean.ranked()[-1].layer_sqnr_db > 25  # every int8 layer adds little noise


def test_embedding_row_matches_direct_computation(default_model, int8_artifact, data):
    """The embedding's input is exact, so its row is the SQNR of the int8 table against the float one on
    the same (unpadded) tokens, computed here from the weights with numpy."""
    from safetensors.numpy import load_file

    report = debug(str(default_model[0]), int8_artifact, str(data))
    row = next(r for r in report.rows if r.name == "model.embed_tokens")
    assert row.sqnr_in_db is None
    table = load_file(str(default_model[0] / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float64)
    scale = np.abs(table).max(1, keepdims=True) / 127
    deq = np.clip(np.round(table / scale), -127, 127) * scale
    batch = np.load(data)
    ids = batch["input_ids"][batch["attention_mask"] != 0]
    want = 10 * np.log10((table[ids] ** 2).sum() / ((deq[ids] - table[ids]) ** 2).sum())
    assert row.sqnr_out_db == pytest.approx(want, abs=0.01)
    assert row.layer_sqnr_db == pytest.approx(want, abs=0.01)
    # the model's output error is reported beside the layers
    assert 20 < report.outputs["logits"]["sqnr_db"] < 60


def test_wrong_source_is_refused(hf_dir, int8_artifact, data):
    result = CliRunner().invoke(main, ["debug", str(hf_dir("llama")), str(int8_artifact), "--data", str(data)])
    assert result.exit_code == 2
    assert "compiled from another model" in result.output


def test_rows_name_the_rules_that_made_the_layer(default_model, int8_artifact, data):
    """Each layer's row names the rewrite rules whose nodes lie between its probes (effc.provenance in
    model.onnx): int8's linear rule for the projections, its embedding rule for the table."""
    report = debug(str(default_model[0]), int8_artifact, str(data))
    rules = {r.name: r.rules for r in report.rows}
    assert rules[PLANTED] == ["int8/linear_dynamic"], rules[PLANTED]
    linear = {k: v for k, v in rules.items() if not k.endswith("self_attn")}
    assert all(r.startswith("int8/") for row in linear.values() for r in row), linear
    assert rules["model.layers.0.self_attn"] == ["kv_attention/gqa", "rotary/rope"]  # ort's attention lowering
    assert rules["model.embed_tokens"] and "embedding" in rules["model.embed_tokens"][0], rules
    assert "  rules" in report.table().splitlines()[0] and "int8/linear_dynamic" in report.table()
    assert report.to_dict()["ranked"][0]["rules"]

"""The real trained all-MiniLM-L6-v2: compile, golden check against eager PyTorch and the stored
golden, a corrupted weight fails the check (exit 1), a tampered file is refused on open (exit 2)."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from effc.cli import main
from effc.golden import load as load_golden
from effc.golden import save as save_golden
from tests.artifacts import rewrite_manifest_hashes
from tests.conftest import GOLDENS

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Compilers turn one program into another that computes the same thing.",
]


def tokenize(model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


@pytest.fixture(scope="module")
def compiled(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm_art") / "ort"
    result = CliRunner().invoke(main, ["compile", str(minilm_dir), "--target", "ort", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def golden(minilm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("minilm_golden")
    np.savez(path / "in.npz", **tokenize(minilm_dir))
    result = CliRunner().invoke(main, ["golden", "record", str(minilm_dir), "--inputs", str(path / "in.npz"),
                                       "-o", str(path / "golden.npz")])
    assert result.exit_code == 0, result.output
    return path / "golden.npz"


def test_golden_check_passes(compiled, golden):
    result = CliRunner().invoke(main, ["golden", "check", str(compiled), str(golden), "--atol", "1e-4", "--rtol", "1e-3"])
    assert result.exit_code == 0, result.output
    assert "last_hidden_state" in result.output and "FAIL" not in result.output


def test_eager_matches_stored_golden(golden, update_goldens):
    """tests/goldens/minilm.npz pins what the real model computes; it changes only with --update-goldens."""
    inputs, outputs, meta = load_golden(golden)
    stored = GOLDENS / "minilm.npz"
    if update_goldens:
        save_golden(stored, inputs, outputs, {"reference": meta["reference"], "model": "all-MiniLM-L6-v2"})
    assert stored.exists(), "tests/goldens/minilm.npz is missing: run pytest --update-goldens on purpose"
    _, want, _ = load_golden(stored)
    mask = inputs["attention_mask"].astype(bool)
    assert set(want) == set(outputs) == {"last_hidden_state", "pooler_output"}
    for name, ref in want.items():
        got = outputs[name]
        if ref.shape[:2] == mask.shape:  # padded positions carry no meaning
            got, ref = got[mask], ref[mask]
        assert np.abs(got - ref).max() <= 1e-4, name
    # a real embedding model: sentences differ, embeddings are unit-scale and not degenerate
    pooled = (outputs["last_hidden_state"] * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    assert (pooled @ pooled.T)[0, 1] < 0.9


def test_corrupted_weight_fails_check(compiled, golden, tmp_path):
    """One weight changed (and the manifest re-hashed, so only the numbers can tell): exit code 1."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(compiled, bad)
    model = onnx.load(bad / "model.onnx")
    matmul_weights = {i for n in model.graph.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm") for i in n.input}
    big = next(t for t in model.graph.initializer if t.name in matmul_weights and len(t.dims) == 2)
    w = numpy_helper.to_array(big).copy()
    w.flat[w.size // 2] += 1.0  # one weight of the first projection
    big.CopyFrom(numpy_helper.from_array(w, big.name))
    onnx.save(model, bad / "model.onnx")
    rewrite_manifest_hashes(bad)
    result = CliRunner().invoke(main, ["golden", "check", str(bad), str(golden), "--atol", "1e-4", "--rtol", "1e-3"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_tampered_file_is_refused(compiled, golden, tmp_path):
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(compiled, bad)
    with open(bad / "model.onnx", "r+b") as f:
        f.seek(-10, 2)
        byte = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = CliRunner().invoke(main, ["golden", "check", str(bad), str(golden)])
    assert result.exit_code == 2
    assert "tampered" in result.output and "model.onnx" in result.output
    from effc.errors import EffcError
    from effc.runtime import open as open_artifact

    with pytest.raises(EffcError, match="tampered"):
        open_artifact(bad)


def test_int8_reported_accuracy_is_the_artifacts_measured_independently(minilm_dir, tmp_path):
    """The accuracy `effc compile --passes int8` reports equals one computed here without effc's runtime or
    comparison code: stock onnxruntime on the artifact's model.onnx and eager transformers, fed the
    verification inputs the accuracy is measured on (the example inputs, made as effc.inputs makes them)."""
    import json

    import onnxruntime as ort
    import torch
    import transformers

    from effc.inputs import example_inputs

    out = tmp_path / "int8"
    result = CliRunner().invoke(main, ["compile", str(minilm_dir), "--passes", "int8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    reported = json.loads((out / "report.json").read_text())["accuracy_vs_eager"]
    assert reported["measured_on"] == "artifact"
    manifest = json.loads((out / "manifest.json").read_text())

    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    feeds = {k: v.numpy() for k, v in example_inputs(model, model.config).items()}
    with torch.no_grad():
        eager = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    # The ort target saves ONNX Runtime's optimized graph (manifest target.optimization_level), to be run
    # as it is: a session at ORT's default level would optimize it again and fuse what the target left
    # unfused on purpose (SkipLayerNormalization: slower here), which rounds differently (README, ort target).
    assert manifest["target"]["optimization_level"] == "ORT_ENABLE_EXTENDED"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(out / manifest["model_file"]), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})))
    keep = feeds["attention_mask"] != 0
    by_name = {o["name"]: o for o in reported["outputs"]}
    assert set(by_name) == set(names)
    for name in names:
        r, g = getattr(eager, name).double().numpy(), got[name].astype(np.float64)
        if r.shape[:2] == keep.shape:  # [batch, sequence, ...]: padding positions left out
            r, g = r[keep], g[keep]
        r, g = r.ravel(), g.ravel()
        sqnr = 10 * np.log10((r ** 2).sum() / ((g - r) ** 2).sum())
        cosine = (r @ g) / (np.linalg.norm(r) * np.linalg.norm(g))
        print(f"{name}: reported SQNR {by_name[name]['sqnr_db']:.9f} dB, here {sqnr:.9f}; "
              f"cosine {by_name[name]['cosine']:.12f}, here {cosine:.12f}")
        assert abs(by_name[name]["sqnr_db"] - sqnr) < 1e-6
        assert abs(by_name[name]["cosine"] - cosine) < 1e-6

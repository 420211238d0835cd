"""The command line: every bad input is one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model

from effc.cli import main
from examples.models import build


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("effc: error:") or ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    for n in needles:
        assert n in errors[0], errors[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def wrong_adapters(tmp_path_factory):
    """A LoRA trained for a narrower Llama (shapes don't fit the default), and one for GPT-2 modules."""
    root = tmp_path_factory.mktemp("adapters")
    narrow = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    narrow.save_pretrained(root / "narrow")
    gpt2 = get_peft_model(build("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    gpt2.save_pretrained(root / "gpt2")
    return root


@pytest.fixture(scope="module")
def artifact(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "art"
    result = run("compile", default_model[0], "--target", "onnx", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_bad_compile_inputs(default_model, wrong_adapters, tmp_path):
    model, adapter = default_model
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "nope",), ["no such model directory"]),
        ((tmp_path,), ["not a model directory", "config.json"]),
        ((model, "--adapter", wrong_adapters / "narrow"), ["does not fit", "q_proj", "[4, 64]", "[4, 128]"]),
        ((model, "--adapter", wrong_adapters / "gpt2"), ["does not fit", "c_attn"]),
        ((model, "--adapter", tmp_path / "missing"), ["no such directory"]),
        ((model, "--passes", "nosuchpass"), ["unknown pass 'nosuchpass'", "cleanup"]),
        ((model, "--passes", "cleanup", "--pass-config", "cleanup.nokey=1"), ["no config key 'nokey'", "remove_asserts"]),
        ((model, "--passes", "cleanup", "--pass-config", "cleanup.remove_asserts=maybe"), ["not a boolean"]),
        ((model, "--passes", "cleanup", "--pass-config", "cleanup"), ["pass.key=value"]),
        ((model, "--pass-config", "cleanup.remove_asserts=true"), ["not in --passes"]),
        ((model, "--target", "tflite"), ["unknown target 'tflite'", "onnx", "ort"]),
        ((model, "--input-shapes", "input_ids:axb"), ["--input-shapes"]),
        ((model, "--input-shapes", "pixels:2x3"), ["pixels"]),
        ((model, "--input-shapes", "input_ids:1x16,attention_mask:1x16"), ["size 0 or 1", "still runs batch 1"]),
        (("no_such_module:make",), ["cannot import module"]),
    ]
    for args, needles in cases:
        result = run("compile", *args, "-o", out)
        one_line_error(result, *needles)
        assert not out.exists(), args
    assert [p.name for p in tmp_path.iterdir()] == [], "a failed compile left files behind"


def test_existing_output_needs_force(artifact):
    one_line_error(run("compile", "examples/default/model", "-o", artifact), "already exists", "--force")


def test_failed_verification_leaves_nothing(default_model, tmp_path):
    out = tmp_path / "out"
    result = run("compile", default_model[0], "-o", out, "--atol", "-1", "--rtol", "0")
    assert result.exit_code == 1 and "does not match eager PyTorch" in result.output
    assert list(tmp_path.iterdir()) == []


def test_npz_that_does_not_match(artifact, tmp_path):
    ids = np.zeros((1, 8), dtype=np.int64)
    np.savez(tmp_path / "names.npz", tokens=ids, attention_mask=ids)
    np.savez(tmp_path / "dtype.npz", input_ids=ids.astype(np.int32), attention_mask=ids)
    np.savez(tmp_path / "rank.npz", input_ids=ids[0], attention_mask=ids)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "pickled.npz", input_ids=np.array([{"a": 1}], dtype=object))
    out = tmp_path / "out.npz"
    one_line_error(run("run", artifact, "--inputs", tmp_path / "names.npz", "--save-outputs", out), "missing input_ids", "unexpected tokens")
    one_line_error(run("run", artifact, "--inputs", tmp_path / "dtype.npz", "--save-outputs", out), "input_ids", "int32", "int64")
    one_line_error(run("run", artifact, "--inputs", tmp_path / "rank.npz", "--save-outputs", out), "rank 1")
    one_line_error(run("run", artifact, "--inputs", tmp_path / "pickled.npz", "--save-outputs", out), "pickled")
    one_line_error(run("run", artifact, "--inputs", tmp_path / "absent.npz"), "no such file")
    assert not out.exists()


def test_run_and_inspect(artifact, tmp_path):
    feeds = {"input_ids": np.arange(24, dtype=np.int64).reshape(2, 12), "attention_mask": np.ones((2, 12), np.int64)}
    np.savez(tmp_path / "in.npz", **feeds)
    result = run("run", artifact, "--inputs", tmp_path / "in.npz", "--save-outputs", tmp_path / "out.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as out:
        assert out["logits"].shape == (2, 12, 1024)
    result = run("inspect", artifact)
    assert result.exit_code == 0
    for needle in ("input_ids: int64[batch, sequence]", "logits: float32[batch, sequence, 1024]", "MatMul",
                   "verified:  passed", "model.onnx"):
        assert needle in result.output


def test_passes_lists_registry():
    result = run("passes")
    assert result.exit_code == 0 and "cleanup" in result.output and "fx" in result.output


def test_golden_tolerance_flags(artifact, tmp_path):
    result = run("golden", "record", "examples/default/model", "--input-shapes", "input_ids:2x9", "-o", tmp_path / "g.npz")
    assert result.exit_code == 0, result.output
    one_line_error(run("golden", "check", artifact, tmp_path / "g.npz", "--atol", "1e-4"), "together")
    one_line_error(run("golden", "check", artifact, tmp_path / "g.npz", "--per-output", "logits:atol=1"), "atol=X,rtol=Y")
    one_line_error(run("golden", "check", artifact, tmp_path / "g.npz", "--per-output", "nope:atol=1,rtol=1"), "nope")
    ok = run("golden", "check", artifact, tmp_path / "g.npz", "--per-output", "logits:atol=1e-4,rtol=1e-3")
    assert ok.exit_code == 0, ok.output
    # a tolerance tighter than the measured error is a regression: exit 1
    strict = run("golden", "check", artifact, tmp_path / "g.npz", "--atol", "0", "--rtol", "0")
    assert strict.exit_code == 1 and "FAIL" in strict.output


def test_bench_vs_eager(artifact):
    result = run("bench", artifact, "--vs-eager", "--seq", "16", "--warmup", "1", "--iters", "3")
    assert result.exit_code == 0, result.output
    for needle in ("p50 ms", "p90 ms", "peak RSS MB", "artifact / eager latency (p50)", "eager"):
        assert needle in result.output

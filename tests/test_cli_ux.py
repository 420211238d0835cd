"""The command line as a new user meets it: mistakes answered at once, quiet output, --debug anywhere, examples."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import effc
from effc.cli import main
from effc.errors import EffcError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "default" / "model"
ADAPTER = ROOT / "examples" / "default" / "adapter"

# Runs the CLI in a fresh interpreter and says, after it exits, whether torch was imported.
PROBE = """
import sys
from effc.cli import main
try:
    main(sys.argv[1:], prog_name="effc")
finally:
    print("torch imported:", "torch" in sys.modules)
"""


def effc_fresh(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def refusal_cases(tmp_path: Path) -> list[tuple[tuple, str]]:
    no_config = tmp_path / "not-an-adapter"
    no_config.mkdir()
    out = tmp_path / "out"
    return [
        (("compile", tmp_path / "nope", "-o", out), "no such model directory"),
        (("compile", tmp_path, "-o", out), "no config.json"),
        (("compile", "no_such_module:make", "-o", out), "cannot import module 'no_such_module'"),
        (("compile", MODEL, "--passes", "cleanup,nope", "-o", out), "unknown pass 'nope'"),
        (("compile", MODEL, "--pass-config", "int8.mode=static", "-o", out), "int8 is not in --passes"),
        (("compile", MODEL, "--target", "tflite", "-o", out), "unknown target 'tflite'"),
        (("compile", MODEL, "--adapter", tmp_path / "missing", "-o", out), "no such directory"),
        (("compile", MODEL, "--adapter", no_config, "-o", out), "no adapter_config.json"),
        (("compile", MODEL, "--input-shapes", "input_ids:axb", "-o", out), "--input-shapes"),
        (("compile", MODEL, "--passes", "int8", "--calib", tmp_path / "calib.json", "-o", out), "no such file"),
        (("compile", MODEL, "--passes", "int8", "--calib-data", tmp_path / "text.txt", "-o", out), "no such file"),
        (("golden", "record", tmp_path / "nope", "-o", tmp_path / "g.npz"), "no such model directory"),
        (("calibrate", MODEL, "--data", tmp_path / "text.txt", "-o", tmp_path / "c.json"), "no such file"),
        (("debug", MODEL, tmp_path / "art", "--data", tmp_path / "text.txt"), "no such file"),
        (("golden", "check", tmp_path / "art", tmp_path / "g.npz", "--atol", "1"), "together"),
    ]


def test_refusals_answer_before_torch_is_imported(tmp_path):
    for args, needle in refusal_cases(tmp_path):
        result = effc_fresh(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("effc: error:") and needle in lines[0], (args, result.stderr)
        assert result.stdout.strip() == "torch imported: False", (args, result.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-an-adapter"], "a refusal wrote something"


def test_usage_errors_answer_before_torch_is_imported():
    result = effc_fresh("compile", MODEL)  # no -o
    assert result.returncode == 2
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")] == ["Error: Missing option '-o' / '--output'."]
    assert result.stdout.strip() == "torch imported: False"


def test_missing_adapter_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch):
    """Through the Python API too: effc.compile runs the same checks as the CLI before sources.load."""
    from effc import sources

    monkeypatch.setattr(sources, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(EffcError, match="no such directory"):
        effc.compile(str(MODEL), tmp_path / "out", adapters=[str(tmp_path / "missing")])
    with pytest.raises(EffcError, match="unknown pass 'nope'.*unknown target 'tflite'"):
        effc.compile(str(MODEL), tmp_path / "out", passes=["nope"], target="tflite")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["--debug", "compile", "NOPE", "-o", "OUT"],
    ["compile", "--debug", "NOPE", "-o", "OUT"],
    ["compile", "NOPE", "-o", "OUT", "--debug"],
    ["golden", "--debug", "record", "NOPE", "-o", "OUT"],
    ["golden", "record", "NOPE", "-o", "OUT", "--debug"],
])
def test_debug_is_accepted_before_or_after_the_subcommand(args, tmp_path):
    args = [str(tmp_path / a) if a in ("NOPE", "OUT") else a for a in args]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, EffcError), result.output  # the traceback is shown, not one line
    plain = CliRunner().invoke(main, [a for a in args if a != "--debug"])
    assert plain.exit_code == 2 and "effc: error: " in plain.output and plain.exception.__class__ is SystemExit


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


@pytest.mark.parametrize("command", [(), *_commands(main)], ids=lambda c: " ".join(c) or "effc")
def test_every_help_shows_an_example(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    example = result.output.split("Example:", 1)
    assert len(example) == 2, result.output
    assert "effc " in example[1].split("Options:")[0], "the example is a command line"


def test_passes_lists_the_needs_that_depend_on_config():
    result = CliRunner().invoke(main, ["passes"])
    assert result.exit_code == 0
    assert "calibration (mode=static, outlier_threshold, smoothquant_alpha)" in result.output
    assert "calibration_data (method=gptq|awq)" in result.output


def test_quiet_drops_only_the_known_messages(capsys):
    from effc.quiet import quiet

    logger = logging.getLogger("transformers.configuration_utils")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet():
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
                warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
                warnings.warn("another deprecation", FutureWarning)
                logger.warning("Model config: eos_token_id must be `None` or an integer within the vocabulary (0..511)")
                logger.warning("Model config: something else")
            logger.warning("Model config: bos_token_id must be `None` or an integer within the vocabulary (0..511)")
    finally:
        logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == ["another deprecation"]
    assert records == ["Model config: something else",
                       "Model config: bos_token_id must be `None` or an integer within the vocabulary (0..511)"]


def test_a_compile_prints_no_third_party_warning(tmp_path):
    """The README quickstart's compile: only effc's progress and report (one real compile, ~20 s)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    result = subprocess.run(["effc", "compile", MODEL, "--adapter", ADAPTER, "--passes", "merge_lora,cleanup",
                             "--target", "ort", "-o", tmp_path / "q"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    noise = [ln for ln in output.splitlines() if "Warning" in ln or "Loading weights" in ln or "kernels" in ln
             or ln.startswith("[transformers]")]
    assert noise == [], output
    assert "effc: pass merge_lora (1/2)..." in output and "verification vs eager PyTorch: passed" in output

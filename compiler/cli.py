"""The `effc` command line. User errors print one line and exit 2; a failed check exits 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from effc.errors import EffcError, VerificationError


def _set_debug(ctx, _param, value):
    if value:
        ctx.meta["effc.debug"] = True  # meta is shared by the group's and the command's contexts


def _debug_option() -> click.Option:
    """--debug on every group and command, so it may come before or after the subcommand."""
    return click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_debug,
                        help="Show tracebacks instead of one-line errors, and third-party warnings.")


class Command(click.Command):
    """Runs with the known third-party noise filtered (effc.quiet), unless --debug."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(_debug_option())

    def invoke(self, ctx):
        if ctx.meta.get("effc.debug"):
            return super().invoke(ctx)
        from effc.quiet import quiet

        with quiet():
            return super().invoke(ctx)


class Group(click.Group):
    """Turns EffcError into one line on stderr and an exit code; --debug shows the traceback."""

    command_class = Command
    group_class = type  # subgroups (golden) are Groups too

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(_debug_option())

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EffcError as e:
            if ctx.meta.get("effc.debug"):
                raise
            click.echo(f"effc: error: {e}", err=True)
            ctx.exit(1 if isinstance(e, VerificationError) else 2)


@click.group(cls=Group)
@click.version_option(package_name="effc")
def main():
    """effc: compile trained PyTorch models into smaller, faster, verified artifacts.

    \b
    Example:
      effc compile ./my-llama --adapter ./my-lora --passes merge_lora,cleanup --target ort -o out/llama
      effc COMMAND --help
    """


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def _split(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _sign_key(help_text: str):
    """--sign-key FILE (or EFFC_SIGN_KEY): the HMAC key that signs (compile) or must have signed (the rest)."""
    return click.option("--sign-key", type=click.Path(path_type=Path), envvar="EFFC_SIGN_KEY", help=help_text)


_SIGNED = _sign_key("Refuse ARTIFACT unless it was signed with this key file (env EFFC_SIGN_KEY).")


# Everything that loads a model takes it: code in a model directory (config.json's auto_map) never runs otherwise.
_TRUST = click.option("--trust-remote-code", is_flag=True,
                      help="Run the model directory's own Python code (config.json auto_map); only for code you have read.")


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Artifact directory to create.")
@click.option("--adapter", "adapters", multiple=True, help="PEFT adapter directory to apply on the base (repeatable).")
@click.option("--passes", "passes", multiple=True, help="Comma-separated passes, in order (see `effc passes`).")
@click.option("--pass-config", "pass_config", multiple=True, help="pass.key=value (repeatable).")
@click.option("--target", default="ort", show_default=True,
              help="onnx (portable), ort (ONNX Runtime), torch (AOTInductor + effc kernels) or trt (TensorRT).")
@click.option("--input-shapes", help="Example input shapes, e.g. input_ids:1x128,attention_mask:1x128; a dim "
              "MIN-OPT-MAX (input_ids:1-1-8x1-128-512) also sets the TensorRT profile's range, the example takes OPT.")
@click.option("--atol", default=1e-4, show_default=True, help="Verification tolerance (absolute).")
@click.option("--rtol", default=1e-3, show_default=True, help="Verification tolerance (relative).")
@click.option("--no-verify", is_flag=True, help="Skip the check against eager PyTorch.")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="Write the graph after each pass into this directory.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration file from `effc calibrate` (int8 static).")
@click.option("--calib-data", help="Calibrate inline on this data (text, .jsonl, .npz or a directory).")
@click.option("--calib-method", default="entropy", show_default=True,
              type=click.Choice(["minmax", "percentile", "entropy", "mse"]))
@click.option("--calib-samples", default=512, show_default=True, help="Samples for --calib-data.")
@_TRUST
@click.option("--task", help="Load with this head instead of config.json's architectures: feature-extraction, "
                             "text-generation-with-past (the default for causal LMs: with the KV cache), "
                             "text-generation (one forward, no cache), fill-mask, sequence-classification, "
                             "token-classification, question-answering.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@_sign_key("Sign the artifact with an HMAC-SHA256 keyed with this file's bytes (env EFFC_SIGN_KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def compile(model, output, adapters, passes, pass_config, target, input_shapes, atol, rtol, no_verify, dump_ir,
            calib, calib_data, calib_method, calib_samples, trust_remote_code, task, force, sign_key, as_json):
    """Compile MODEL (Hugging Face model directory or module:callable) into an artifact directory.

    \b
    Example:
      effc compile ./my-llama --adapter ./my-lora --passes merge_lora,cleanup --target ort -o out/llama
      effc compile ./my-llama --passes int8 --pass-config int8.mode=static --calib-data text.txt -o out/q
    """
    from effc import outdir, preflight

    # Everything that needs no model is checked before the compiler (and torch) is imported.
    shapes = preflight.parse_shapes(input_shapes)
    outdir.check(output, force, model, adapters)
    preflight.check_compile(model, adapters, _split(passes), pass_config, target, calib, calib_data)
    import effc

    report = effc.compile(model, output, adapters=adapters, passes=_split(passes), pass_config=pass_config,
                          target=target, input_shapes=shapes,
                          shape_ranges=preflight.parse_shape_ranges(input_shapes), verify=not no_verify, atol=atol,
                          rtol=rtol, dump_ir=dump_ir, calib=calib, calib_data=calib_data, calib_method=calib_method,
                          calib_samples=calib_samples, trust_remote_code=trust_remote_code, task=task, force=force,
                          sign_key=sign_key, progress=_say)
    click.echo(json.dumps(report.to_dict(), indent=2, default=str) if as_json else report.table())
    click.echo(f"wrote {output}", err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and report as JSON.")
@click.option("--provenance", is_flag=True, help="List each rewrite rule and the model.onnx nodes it made.")
@_SIGNED
def inspect(artifact, as_json, sign_key, provenance):
    """What is in ARTIFACT: inputs/outputs, operators, sizes, passes, verification.

    \b
    Example:
      effc inspect out/llama
    """
    from effc.runtime.manifest import REPORT, read_manifest

    manifest = read_manifest(artifact, sign_key=sign_key)
    report = json.loads((artifact / REPORT).read_text()) if (artifact / REPORT).is_file() else {}
    if as_json:
        click.echo(json.dumps({"manifest": manifest, "report": report}, indent=2))
        return
    if provenance:
        _print_provenance(artifact, manifest)
        return
    src = manifest["source"]
    click.echo(f"artifact:  {artifact}  (format {manifest['format_version']}, effc {manifest['effc_version']}, {manifest['created']})")
    click.echo(f"source:    {src['spec']}  sha256 {src['sha256'][:16]}…")
    for a in src.get("adapters", []):
        click.echo(f"adapter:   {a['path']}  sha256 {a['sha256'][:16]}…")
    t = manifest["target"]
    click.echo(f"target:    {t['name']}  " + "  ".join(f"{k}={v}" for k, v in t.items() if k != "name"))
    click.echo("passes:    " + (", ".join(p["name"] for p in manifest["passes"]) or "(none)"))
    click.echo("signed:    " + ("no" if not manifest.get("signature") else "HMAC-SHA256, verified with the given key"
                                if sign_key else "HMAC-SHA256 (give --sign-key to check it)"))
    if manifest.get("adapters"):
        a = manifest["adapters"]
        click.echo(f"adapters:  {', '.join(a['files'])} (switchable; default {a['default']}; "
                   f"{len(a['inputs'])} weight inputs; select with `effc run --adapter NAME`)")
    for kind in ("inputs", "outputs"):
        for io in manifest[kind]:
            click.echo(f"{kind[:-1]:<10} {io['name']}: {io['dtype']}[{', '.join(map(str, io['shape']))}]")
    click.echo("files:")
    for name in manifest["files"]:
        click.echo(f"  {name:<22} {(artifact / name).stat().st_size / 1e6:>10.3f} MB")
    if report:
        ops = report.get("ops", {})
        click.echo(f"operators: {sum(ops.values())} nodes: " + ", ".join(f"{k} {v}" for k, v in ops.items()))
        from effc.report import bits_per_parameter

        click.echo(f"weights:   {report['param_bytes_captured'] / 1e6:.3f} MB captured; artifact {report['artifact_bytes'] / 1e6:.3f} MB"
                   f" = {bits_per_parameter(report['artifact_bytes'], report.get('params_captured', 0))}")
        for p in report.get("passes", []):
            changes = ", ".join(f"{k}: {v}" for k, v in p["counts"].items() if v) or "no change"
            click.echo(f"pass {p['name']}: {changes}")
    v = manifest.get("verification")
    against = "the graph after its passes" if report.get("graph_accuracy_vs_eager") else "eager PyTorch"
    click.echo("verified:  " + (f"{'passed' if v['passed'] else 'FAILED'}, max |Δ| {v['max_abs']:.3g} vs {against} "
                                f"(atol {v['atol']:g}, rtol {v['rtol']:g})" if v else "no (--no-verify)"))
    from effc.report import accuracy_lines

    for line in accuracy_lines(report, "accuracy:  the artifact vs eager fp32, "):
        click.echo(line)


def _print_provenance(artifact: Path, manifest: dict) -> None:
    """The rules that made the artifact's nodes (the effc.provenance node metadata of model.onnx)."""
    if not str(manifest.get("model_file", "")).endswith(".onnx"):
        raise EffcError(f"{artifact} is a {manifest.get('model_file')} artifact: node provenance is recorded in "
                        "model.onnx only (targets onnx and ort)")
    import onnx

    from effc.targets.onnx_nodes import provenance_summary

    from effc.runtime.manifest import artifact_file

    model = artifact_file(Path(artifact), manifest, manifest["model_file"], "model_file")
    made = provenance_summary(onnx.load(str(model), load_external_data=False))
    click.echo(f"{'rule':<28} {'nodes':>6}  ops")
    for rule, ops in made.items():
        click.echo(f"{rule or '(untagged)':<28} {sum(ops.values()):>6}  "
                   + ", ".join(f"{op} x{n}" for op, n in ops.most_common()))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_npz", required=True, help=".npz of named input arrays.")
@click.option("--save-outputs", type=click.Path(path_type=Path), help="Write the outputs to this .npz.")
@click.option("--threads", type=int, help="Intra-op threads (default: ONNX Runtime's choice).")
@click.option("--adapter", help="Switchable adapter to run with (see `effc inspect`).")
@_SIGNED
def run(artifact, inputs_npz, save_outputs, threads, adapter, sign_key):
    """Run ARTIFACT on the arrays in an .npz.

    \b
    Example:
      effc run out/llama --inputs in.npz --save-outputs out.npz
    """
    import numpy as np

    from effc.inputs import load_npz
    from effc.runtime import open as open_artifact

    if save_outputs and not save_outputs.parent.is_dir():
        raise EffcError(f"--save-outputs {save_outputs}: no such directory {save_outputs.parent}; create it first")
    feeds = load_npz(inputs_npz)
    with open_artifact(artifact, threads=threads, adapter=adapter, sign_key=sign_key) as session:
        click.echo(f"ran on {session.backend}", err=True)
        outputs = session.run(feeds)
    for name, value in outputs.items():
        click.echo(f"{name}: {value.dtype}{list(value.shape)}  mean {float(np.mean(value)):.6g}  std {float(np.std(value)):.6g}")
    if save_outputs:
        np.savez(save_outputs, **outputs)
        click.echo(f"wrote {save_outputs}", err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable: a left-padded batch).")
@click.option("--prompt-ids", "prompt_ids", multiple=True, help="Prompt as token ids, e.g. 1,2,3 (repeatable).")
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy; above 0: sample.")
@click.option("--top-k", default=0, show_default=True, help="Sample from the K likeliest tokens (0: all).")
@click.option("--top-p", default=1.0, show_default=True, help="Sample from the smallest set with this probability.")
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--repetition-penalty", default=1.0, show_default=True)
@click.option("--stop", multiple=True, help="Stop a row when its text contains this (repeatable).")
@click.option("--adapter", help="Switchable adapter to generate with (see `effc inspect`).")
@click.option("--threads", type=int, help="Intra-op threads (default: ONNX Runtime's choice).")
@click.option("--stream", is_flag=True, help="Print tokens as they come (one prompt).")
@click.option("--json", "as_json", is_flag=True, help="Print token ids, text and timings as JSON.")
@_SIGNED
def generate(artifact, prompts, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty,
             stop, adapter, threads, stream, as_json, sign_key):
    """Generate text with a decoder ARTIFACT (compiled with its KV cache).

    \b
    Example:
      effc generate out/llama --prompt "Once upon a time" --max-new-tokens 64
    """
    from effc.runtime import open as open_artifact

    if bool(prompts) == bool(prompt_ids):
        raise EffcError("give the prompt with --prompt TEXT or --prompt-ids 1,2,3 (one of them, repeatable)")
    if stream and len(prompts) + len(prompt_ids) > 1:
        raise EffcError("--stream prints one prompt's tokens; give one --prompt")
    rows = list(prompts)
    for text in prompt_ids:
        try:
            rows.append([int(t) for t in text.replace(" ", "").split(",") if t])
        except ValueError:
            raise EffcError(f"--prompt-ids {text!r}: give comma-separated integers, e.g. 1,2,3") from None

    def show(_row, token, piece):
        click.echo(piece if text_out else f"{token} ", nl=False)

    with open_artifact(artifact, threads=threads, sign_key=sign_key) as session:
        text_out = bool((session.manifest.get("decoder") or {}).get("tokenizer"))
        result = session.generate(rows, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, seed=seed, repetition_penalty=repetition_penalty, stop=stop,
                                  streamer=show if stream and not as_json else None, adapter=adapter)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    if stream:
        click.echo()
    else:
        for b, tokens in enumerate(result.tokens):
            click.echo(result.text[b] if result.text is not None else ",".join(map(str, tokens)))
    speed = f"TTFT {result.ttft_s * 1e3:.1f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s ({result.steps} steps)"
    click.echo(speed, err=True)


@main.command()
@click.argument("model")
@click.option("--data", required=True, help="Text (.txt lines, .jsonl 'text'), .npz of inputs, or a directory of them.")
@click.option("--method", default="entropy", show_default=True, type=click.Choice(["minmax", "percentile", "entropy", "mse"]))
@click.option("--samples", type=int, help="Use at most this many samples.")
@click.option("--max-length", default=128, show_default=True, help="Token limit per text sample.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--percentile", default=99.99, show_default=True, help="For --method percentile.")
@click.option("--adapter", "adapters", multiple=True, help="PEFT adapter directory (repeatable).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Calibration file to write (.json).")
@click.option("--trt-cache", type=click.Path(path_type=Path), help="Also write the ranges as a TensorRT calibration cache, keyed by the tensors of the model's `--target trt` graph.")
@_TRUST
def calibrate(model, data, method, samples, max_length, batch_size, percentile, adapters, output, trt_cache,
              trust_remote_code):
    """Record activation ranges of MODEL on DATA for int8 (`effc compile --calib FILE` reuses them).

    \b
    Example:
      effc calibrate ./my-llama --data text.txt --method entropy --samples 512 -o calib.json
    """
    from effc import preflight

    preflight.check_source(model, adapters, data=data)
    from effc import calibration

    def bar(total):
        return click.progressbar(length=total, label="calibrating", show_eta=True, show_pos=True, file=sys.stderr)

    doc = calibration.run(model, data, output, method, samples, max_length, batch_size, percentile, adapters, bar,
                          trust_remote_code=trust_remote_code, trt_cache=trt_cache)
    amax = [t["amax"] for t in doc["tensors"].values()]
    click.echo(f"wrote {output}: {len(amax)} tensors, {doc['samples']} samples, method {method}, "
               f"amax {min(amax):.3g}..{max(amax):.3g}" + (f"; TensorRT cache {trt_cache}" if trt_cache else ""))


@main.command()
@click.argument("model")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Text (.txt lines, .jsonl 'text'), .npz of inputs, or a directory of them.")
@click.option("--samples", default=32, show_default=True, help="Use at most this many samples.")
@click.option("--max-length", default=128, show_default=True, help="Token limit per text sample.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--adapter", "adapters", multiple=True, help="PEFT adapter directory the artifact was compiled with.")
@click.option("--top", default=15, show_default=True, help="Rows of the ranking to print (0: all).")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw the error per layer to this .png.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the full report as JSON.")
@_SIGNED
@_TRUST
def debug(model, artifact, data, samples, max_length, batch_size, adapters, top, plot, json_out, sign_key,
          trust_remote_code):
    """Rank ARTIFACT's layers by the error each adds against the float MODEL on DATA.

    \b
    Example:
      effc debug ./my-llama out/q --data text.txt --plot layers.png
    """
    from effc import preflight

    preflight.check_source(model, adapters, data=data)
    from effc.debug import debug as run_debug

    def bar(total):
        return click.progressbar(length=total, label="comparing", show_eta=True, show_pos=True, file=sys.stderr)

    report = run_debug(model, artifact, data, adapters=adapters, samples=samples, max_length=max_length,
                       batch_size=batch_size, progress_bar=bar, sign_key=sign_key, trust_remote_code=trust_remote_code)
    for name, o in report.outputs.items():
        click.echo(f"output {name}: SQNR {o['sqnr_db']:.1f} dB, cosine {o['cosine']:.5f}, max |Δ| {o['max_abs']:.3g}")
    click.echo(f"layers ranked by the error they add ({len(report.rows)} compared):")
    click.echo(report.table(top or None))
    click.echo(report.advice())
    if plot:
        report.plot(str(plot))
        click.echo(f"wrote {plot}")
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        click.echo(f"wrote {json_out}")


@main.group()
def golden():
    """Record reference outputs from eager PyTorch and check artifacts against them.

    \b
    Example:
      effc golden record ./my-llama --input-shapes input_ids:4x64 -o golden.npz
      effc golden check out/llama golden.npz
    """


@golden.command("record")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Golden .npz to write.")
@click.option("--adapter", "adapters", multiple=True, help="PEFT adapter directory (repeatable).")
@click.option("--inputs", "inputs_npz", help=".npz of inputs (default: made from the model's config).")
@click.option("--input-shapes", help="Shapes for made-up inputs, e.g. input_ids:2x64.")
@_TRUST
def golden_record(model, output, adapters, inputs_npz, input_shapes, trust_remote_code):
    """Run MODEL in eager PyTorch and save its inputs and outputs.

    \b
    Example:
      effc golden record ./my-llama --adapter ./my-lora --input-shapes input_ids:4x64 -o golden.npz
    """
    from effc import preflight

    shapes = preflight.parse_shapes(input_shapes)
    preflight.check_source(model, adapters)
    from effc import golden as golden_mod

    outputs = golden_mod.record(model, output, adapters, inputs_npz, shapes,
                                trust_remote_code=trust_remote_code)
    click.echo(f"wrote {output}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()))


@golden.command("check")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("golden_file", type=click.Path(path_type=Path))
@click.option("--atol", type=float, help="Absolute tolerance (give with --rtol; default depends on precision).")
@click.option("--rtol", type=float, help="Relative tolerance (give with --atol).")
@click.option("--per-output", multiple=True, help="NAME:atol=X,rtol=Y for one output (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@_SIGNED
def golden_check(artifact, golden_file, atol, rtol, per_output, as_json, sign_key):
    """Check ARTIFACT against GOLDEN_FILE: exit 0 when every output is within tolerance, 1 when not.

    \b
    Example:
      effc golden check out/llama golden.npz --atol 1e-4 --rtol 1e-3 --per-output logits:atol=1e-3,rtol=1e-2
    """
    if (atol is None) != (rtol is None):
        raise EffcError("give --atol and --rtol together, or neither for the precision-aware default")
    from effc import golden as golden_mod
    from effc.runtime.compare import Tolerance

    tolerance = Tolerance(atol, rtol) if atol is not None else None
    result = golden_mod.check(artifact, golden_file, tolerance, golden_mod.parse_per_output(per_output), sign_key=sign_key)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())
    click.echo("golden check: " + ("PASSED" if result.passed else "FAILED: regression against the golden outputs"), err=True)
    sys.exit(0 if result.passed else 1)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--vs-eager", is_flag=True, help="Also time the source model in eager PyTorch, in the same run.")
@click.option("--inputs", "inputs_npz", help=".npz of inputs (default: made from the artifact's metadata).")
@click.option("--batch", default=1, show_default=True)
@click.option("--seq", default=128, show_default=True, help="Sequence length for made-up inputs.")
@click.option("--threads", default=2, show_default=True)
@click.option("--warmup", default=5, show_default=True)
@click.option("--iters", default=50, show_default=True)
@click.option("--generate", is_flag=True, help="Time generation (median of up to 5 after one warmup): prefill ms, decode tokens/s, and transformers "
                                               "generate on the source model when its directory is readable.")
@click.option("--new-tokens", default=64, show_default=True, help="Tokens per row for --generate.")
@click.option("--json", "as_json", is_flag=True)
@_SIGNED
def bench(artifact, vs_eager, inputs_npz, batch, seq, threads, warmup, iters, generate, new_tokens, as_json, sign_key):
    """Latency p50/p90, throughput and peak memory of ARTIFACT (and eager PyTorch with --vs-eager).

    \b
    Example:
      effc bench out/llama --vs-eager --batch 1 --seq 128
    """
    from effc import bench as bench_mod

    if generate:
        if new_tokens < 2:
            raise EffcError(f"--new-tokens must be 2 or more for decode tokens/s, got {new_tokens}")
        results = bench_mod.bench_generate(artifact, batch, seq, new_tokens, threads, min(warmup, 1), min(iters, 5),
                                           sign_key=sign_key)
    else:
        results = bench_mod.bench(artifact, vs_eager, batch, seq, threads, warmup, iters, inputs_npz, sign_key=sign_key)
    click.echo(json.dumps(results, indent=2) if as_json else bench_mod.table(results))


@main.command("passes")
def list_passes():
    """The registered passes: name, IR level, what each needs (and with which settings), config keys.

    \b
    Example:
      effc passes
      effc compile ./my-llama --passes int8 --pass-config int8.mode=static --calib calib.json -o out/q
    """
    from effc.passes.registry import PASSES, needs_by_setting, pass_class

    for name in sorted(PASSES):
        cls = pass_class(name)
        p = cls()
        needs = [n.value for n in sorted(p.needs(), key=lambda n: n.value)]
        needs += [f"{n.value} ({', '.join(settings)})" for n, settings in
                  sorted(needs_by_setting(cls).items(), key=lambda item: item[0].value)]
        config = ", ".join(f"{k}={v}" for k, v in p.config.to_dict().items()) or "-"
        click.echo(f"{name:<12} {cls.level.value:<4} {cls.summary}")
        click.echo(f"{'':<17} needs:  {'; '.join(needs) or '-'}")
        click.echo(f"{'':<17} config: {config}")


@main.command("targets")
def list_targets():
    """The targets and whether each can build on this machine.

    \b
    Example:
      effc targets
      effc compile ./my-llama --target onnx -o out/llama-onnx
    """
    import importlib

    from effc.targets.base import TARGETS

    for name, path in TARGETS.items():
        module, _, attr = path.partition(":")
        target = getattr(importlib.import_module(module), attr)()
        reason = target.available()
        click.echo(f"{name:<8} {target.summary}" + (f"  [unavailable: {reason}]" if reason else ""))


@main.command("build-engine")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="TensorRT timing cache to read and update (rebuilds of similar models are faster).")
@_sign_key("The key the artifact was signed with (env EFFC_SIGN_KEY): checked, and the new manifest signed with it.")
def build_engine(artifact, timing_cache, sign_key):
    """Build the TensorRT engine of a trt ARTIFACT on this machine (tensorrt and an NVIDIA GPU): engine.plan
    is written into ARTIFACT, and the manifest records the TensorRT version and the GPU it was built for.

    \b
    Example:
      effc compile ./my-llama --passes int8 --calib-data text.txt --target trt -o out/llama-trt
      effc build-engine out/llama-trt --timing-cache trt-timing.cache
    """
    from effc.targets.trt_engine import build_engine as build

    info = build(artifact, timing_cache=timing_cache, sign_key=sign_key, progress=_say)
    click.echo(f"wrote {artifact}/{info['file']}: TensorRT {info['tensorrt']}, {info['gpu']} "
               f"(compute capability {info['compute_capability']}), {info['seconds']:.1f} s")

"""effc.compile: load -> capture -> passes -> target -> verify -> atomically written artifact."""

from __future__ import annotations

import datetime
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

import effc
from effc import calibration
from effc import inputs as inputs_mod
from effc import outdir, preflight, sources
from effc.capture import capture, run_torch
from effc.errors import VerificationError
from effc.passes.base import PassContext
from effc.passes.program import node_count, parameter_bytes, parameter_count
from effc.report import CompileReport, PassRecord
from effc.runtime.compare import Tolerance, compare
from effc.runtime.manifest import REPORT, load_key, write_manifest
from effc.targets.base import get_target


def _quiet(_msg: str) -> None:
    pass


VERIFY_LENGTH = 128


def _verification_inputs(example: dict[str, torch.Tensor], config) -> list[dict[str, torch.Tensor]]:
    """The example inputs, plus for text models a second shape (other batch and length, right-padded)
    so a dim specialized by mistake is caught at compile time."""
    sets = [example]
    ids = example.get("input_ids")
    if ids is not None and ids.dim() == 2 and config is not None:
        batch, seq = ids.shape
        limit = inputs_mod.max_positions(config) or 4 * seq
        # Long enough for what people run (bench's default 128): effc.runtime warns beyond what was verified.
        shape = (batch + 1, min(limit, max(2 * seq + 3, VERIFY_LENGTH)))
        sets.append(inputs_mod.make_text_inputs(list(example), config, shape, seed=1, pad="attention_mask" in example))
    return sets


def _write_weight_sets(root: Path, sets: dict[str, dict]) -> dict | None:
    """adapters/<name>.safetensors for each switchable weight set; the manifest entry that lists them."""
    if not sets:
        return None
    from safetensors.numpy import save_file

    (root / "adapters").mkdir()
    files = {}
    for name, arrays in sets.items():
        files[name] = f"adapters/{name}.safetensors"
        save_file({k: v for k, v in arrays.items()}, str(root / files[name]))
    return {"default": next(iter(sets)), "files": files, "inputs": sorted(next(iter(sets.values())))}


def _requirements(pipeline) -> dict[str, list[str]]:
    """What the passes need of the machine that runs the artifact, merged (e.g. {"cpu": ["vnni"]})."""
    merged: dict[str, list[str]] = {}
    for p in pipeline:
        for kind, needs in p.requires().items():
            merged.setdefault(kind, [])
            merged[kind] += [n for n in needs if n not in merged[kind]]
    return merged


def compile(source: str, output: str | Path, *, force: bool = False,  # noqa: A001 - the product's verb
            adapters: list[str] | tuple[str, ...] = (), **options) -> CompileReport:
    """Compile `source` into `output`; the options are _compile's. -o is checked (effc.outdir) and locked
    for the whole compile before anything else: a second compile to the same -o refuses at once."""
    output = outdir.check(output, force, source, adapters)
    with outdir.claim(output, force):
        return _compile(source, output, force=force, adapters=adapters, **options)


def _compile(
    source: str,
    output: str | Path,
    *,
    adapters: list[str] | tuple[str, ...] = (),
    passes: list[str] | tuple[str, ...] = (),
    pass_config: list[str] | tuple[str, ...] = (),
    target: str = "ort",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    dump_ir: str | Path | None = None,
    calib: str | Path | None = None,
    calib_data: str | None = None,
    calib_method: str = "entropy",
    calib_samples: int | None = 512,
    trust_remote_code: bool = False,
    task: str | None = None,
    force: bool = False,
    sign_key: str | Path | bytes | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompileReport:
    """Compile `source` (HF model dir or module:callable) with adapters and passes for `target` into `output`.

    Everything the user typed is validated before any model is loaded. Nothing is left at `output`
    unless the artifact was built and verified.
    """
    say = progress or _quiet
    t_start = time.perf_counter()
    output = Path(output)
    # Paths, passes and target: the same checks the CLI makes before it imports this module.
    pipeline = preflight.check_compile(source, adapters, passes, pass_config, target, calib, calib_data)
    key = load_key(sign_key) if sign_key is not None else None  # HMAC of the manifest's hash (README, Trust)
    target_impl = get_target(target)

    stages: dict[str, float] = {}

    def stage(name: str):
        stages[name] = time.perf_counter()
        say(f"effc: {name}...")

    def done(name: str):
        stages[name] = time.perf_counter() - stages[name]

    stage("load")
    src = sources.load(source, adapters, trust_remote_code=trust_remote_code, task=task)
    # Checked before the (slow) capture: a calibration file of another model is refused right away.
    calibration_doc = calibration.read(Path(calib), model_sha256=src.fingerprint) if calib else None
    for p in pipeline:
        p.prepare(src)
    example = inputs_mod.example_inputs(src.model, src.config, input_shapes, src.example_inputs)
    samples_in_data = calibration.check_data(src, example, calib_data) if calib_data else None  # before the capture
    done("load")

    stage("capture")
    captured = capture(src.model, example, inputs_mod.dynamic_dims(example))
    program = captured.program
    done("capture")
    report = CompileReport(source=src.describe(), target=target, nodes_captured=node_count(program),
                           param_bytes_captured=parameter_bytes(program), params_captured=parameter_count(program))
    if calib_data:
        stage("calibrate")
        calibration_doc = calibration.collect(src, program, example, calib_data, calib_method, calib_samples,
                                              total=samples_in_data)
        done("calibrate")

    stage("reference")
    check_sets = _verification_inputs(example, src.config)
    references = [run_torch(captured.module, s, captured.output_names) for s in check_sets]
    done("reference")

    dump = Path(dump_ir) if dump_ir else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "00_captured.txt").write_text(str(program.graph_module.code))
    data = None
    if calib_data and any(p.reads_data() for p in pipeline):
        # For passes that read activations (GPTQ, AWQ) or measure accuracy (int8.auto_exclude) as they work.
        from effc import dataset

        data = list(dataset.batches(calib_data, list(example), src.spec if src.kind == "hf_dir" else None,
                                    samples=calib_samples))
    ctx = PassContext(example_inputs=example, calibration=calibration_doc, source=src, log=say, data=data)
    for i, p in enumerate(pipeline, 1):
        say(f"effc: pass {p.name} ({i}/{len(pipeline)})...")
        before_nodes, before_bytes = node_count(program), parameter_bytes(program)
        t = time.perf_counter()
        result = p.run(program, ctx)
        seconds = time.perf_counter() - t
        program = result.ir
        # Every fx pass leaves a graph that runs in PyTorch; measure what it did to the outputs.
        got = run_torch(program.module(), example, captured.output_names)
        err = compare(references[0], got, Tolerance(float("inf"), 0.0)).max_abs
        report.passes.append(PassRecord(p.name, p.config.to_dict(), seconds, result.changed, result.counts,
                                        before_nodes, node_count(program), before_bytes, parameter_bytes(program),
                                        err, result.notes))
        if dump:
            (dump / f"{i:02d}_{p.name}.txt").write_text(str(program.graph_module.code))

    if not all(type(p).exact for p in pipeline):
        # Lossy passes: the target must reproduce the transformed graph; what the passes cost against
        # eager PyTorch is the accuracy report, not a verification failure.
        eager = references
        references = [run_torch(program.module(), s, captured.output_names) for s in check_sets]
        if not verify:  # the artifact is not run: the graph after the passes is the best estimate, said so
            report.accuracy_vs_eager = _accuracy(eager[0], references[0], check_sets[0], "graph")
    else:
        eager = None

    tmp = outdir.make_tmp(output)
    try:
        stage(f"build {target}")
        built = target_impl.build(program, example, captured.output_names, captured.dynamic, tmp,
                                  overridable=frozenset(next(iter(ctx.weight_sets.values()), {})))
        weight_sets = _write_weight_sets(tmp, ctx.weight_sets)
        if calibration_doc is not None:
            calibration.write(tmp / "calibration.json", calibration_doc)
        done(f"build {target}")
        report.ops = built.ops
        manifest = {
            "effc_version": effc.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": src.describe(),
            "passes": [{"name": p.name, "config": p.config.to_dict()} for p in pipeline],
            "target": {"name": target, **built.info},
            "model_file": built.model_file,
            "inputs": built.inputs,
            "outputs": built.outputs,
        }
        if weight_sets:
            manifest["adapters"] = weight_sets
        requires = _requirements(pipeline)
        if requires:
            manifest["requires"] = requires  # checked by effc.runtime when the artifact is opened
        manifest["probes"] = built.probes  # layer -> the artifact's values at its input and output (effc debug)
        write_manifest(tmp, manifest)  # provisional, so the runtime can open it for verification

        if verify:
            stage("verify")
            report.verification, artifact_outputs = _verify(tmp, check_sets, references, atol, rtol, eager)
            if eager is not None:  # what the passes cost, measured on the artifact itself
                report.accuracy_vs_eager = _accuracy(eager[0], artifact_outputs[0], check_sets[0], "artifact")
            if weight_sets and report.verification["passed"]:
                report.verification["adapters"] = _verify_adapters(tmp, src, captured, check_sets[0], atol, rtol)
                report.verification["passed"] = all(v["passed"] for v in report.verification["adapters"].values())
            done("verify")
            if not report.verification["passed"]:
                raise VerificationError(_failure(report.verification, target, atol, rtol))
        report.artifact_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        report.stages = {k: round(v, 3) for k, v in stages.items()}
        report.total_seconds = time.perf_counter() - t_start
        manifest["verification"] = report.verification
        (tmp / REPORT).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        write_manifest(tmp, manifest, sign_key=key)
        outdir.publish(tmp, output, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _accuracy(eager: dict, got: dict, feeds: dict, measured_on: str) -> dict:
    """The distance of `got` (the artifact's outputs, or the graph's) to eager PyTorch on one input set."""
    mask = feeds.get("attention_mask")
    return {**compare(eager, got, Tolerance(float("inf"), 0.0),
                      attention_mask=None if mask is None else mask.numpy()).to_dict(), "measured_on": measured_on}


def _failure(verification: dict, target: str, atol: float, rtol: float) -> str:
    """One line naming the check that failed, with its numbers."""
    tail = "; nothing was written"
    lossy = [v for v in verification.get("quantized_rounding", []) if not v["passed"]]
    if lossy:
        v = min(lossy, key=lambda v: v["artifact_sqnr_db_vs_eager"] - v["graph_sqnr_db_vs_eager"])
        return (f"the {target} artifact is less accurate than the graph after the passes: output {v['output']} has "
                f"SQNR {v['artifact_sqnr_db_vs_eager']:.1f} dB against eager PyTorch where the graph has "
                f"{v['graph_sqnr_db_vs_eager']:.1f} dB, and it must be within {LOSSY_SQNR_MARGIN_DB:g} dB of the "
                f"graph{tail} (the runtime computes the quantized ops differently from their reference; "
                "--no-verify skips the check)")
    bad = [o for o in verification["outputs"] if not o.get("passed", True)]
    if bad:
        worst = max(bad, key=lambda o: o["max_abs"])
        return (f"the {target} artifact does not match eager PyTorch: output {worst['name']} max |Δ| "
                f"{worst['max_abs']:.3g} > atol {atol:g} + rtol {rtol:g}·|ref|{tail} "
                "(loosen --atol/--rtol if that error is expected, or --no-verify)")
    adapters = {n: a for n, a in verification.get("adapters", {}).items() if not a["passed"]}
    if adapters:
        name, a = next(iter(adapters.items()))
        return (f"the {target} artifact with switchable adapter {name} does not match eager PyTorch with that adapter: "
                f"max |Δ| {a['max_abs']:.3g} > atol {atol:g} + rtol {rtol:g}·|ref|{tail}")
    return f"the {target} artifact failed verification{tail}"


def _verify_adapters(artifact: Path, src, captured, feeds, atol: float, rtol: float) -> dict:
    """Each switchable adapter selected at run time against the eager model with that adapter active."""
    from effc.runtime.session import Session

    results = {}
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    with Session(artifact, verify_hashes=False) as session:
        for name in session.adapter_names():
            for module in src.model.modules():
                if hasattr(module, "lora_A") and hasattr(module, "set_adapter"):
                    module.set_adapter(name)
            ref = run_torch(captured.module, feeds, captured.output_names)
            result = compare(ref, session.run(np_feeds, adapter=name), Tolerance(atol, rtol),
                             attention_mask=np_feeds.get("attention_mask"))
            results[name] = {"passed": result.passed, "max_abs": result.max_abs}
    return results


# A quantized artifact may round differently from the PyTorch graph: tiny float differences upstream
# flip roundings of coarse activation steps and the two drift apart, each as far from fp32 as the other.
# It passes when it matches the graph within tolerance, or is at least as close to fp32 eager as the
# graph is (SQNR pooled over the verification inputs), less this margin.
LOSSY_SQNR_MARGIN_DB = 1.5


def _verify(artifact: Path, check_sets, references, atol: float, rtol: float, eager=None) -> tuple[dict, list[dict]]:
    """Run the artifact on every verification input set; report the worst set's per-output numbers, and
    the artifact's outputs on each set.

    With `eager` (lossy passes ran), `references` are the post-pass graph's outputs, and an output that
    rounds differently passes when its SQNR to eager, pooled over all sets, is within the margin."""
    from effc.runtime.compare import pooled_sqnr_db
    from effc.runtime.session import Session

    results, shapes, gots, masks = [], [], [], []
    with Session(artifact, verify_hashes=False) as session:
        for feeds, ref in zip(check_sets, references):
            np_feeds = {k: v.numpy() for k, v in feeds.items()}
            masks.append(np_feeds.get("attention_mask"))
            gots.append(session.run(np_feeds))
            results.append(compare(ref, gots[-1], Tolerance(atol, rtol), attention_mask=masks[-1]))
            shapes.append({k: list(v.shape) for k, v in np_feeds.items()})
    lossy = []
    if eager is not None:
        failing = {o.name for r in results for o in r.outputs if not o.passed}
        verdicts = {}
        for name in sorted(failing):
            e = [ref[name] for ref in eager]
            art = pooled_sqnr_db(e, [g[name] for g in gots], masks)
            graph = pooled_sqnr_db(e, [ref[name] for ref in references], masks)
            verdicts[name] = art >= graph - LOSSY_SQNR_MARGIN_DB
            lossy.append({"output": name, "artifact_sqnr_db_vs_eager": art, "graph_sqnr_db_vs_eager": graph,
                          "passed": bool(verdicts[name])})
        for r in results:
            for o in r.outputs:
                if o.name in verdicts:
                    o.passed = verdicts[o.name]
                    o.problem = None if o.passed else "FAIL: less accurate than the graph"
    worst = max(results, key=lambda r: (not r.passed, r.max_abs))
    out = {**worst.to_dict(), "passed": all(r.passed for r in results), "max_abs": max(r.max_abs for r in results),
           "atol": atol, "rtol": rtol, "shapes": shapes}
    if lossy:
        out["quantized_rounding"] = lossy
    return out, gots

"""effc.compile as named stages: load -> capture -> calibrate -> reference -> passes -> build -> verify ->
publish. Each stage takes the compile's State and returns it with its part filled in."""

from __future__ import annotations

import datetime
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import effc
from effc import calibration, decoder
from effc import inputs as inputs_mod
from effc import outdir, preflight, sources
from effc.acceptance import LOSSY
from effc.capture import capture_source, run_torch, source_example
from effc.errors import EffcError, VerificationError
from effc.passes.base import Pass, PassContext
from effc.passes.program import node_count, parameter_bytes, parameter_count
from effc.report import CompileReport, PassRecord
from effc.runtime.backends import runner_class
from effc.runtime.compare import Tolerance, compare
from effc.runtime.manifest import REPORT, load_key, write_manifest
from effc.targets.base import get_target


def _quiet(_msg: str) -> None:
    pass


VERIFY_LENGTH = 128


@dataclass(frozen=True)
class Job:
    """What was asked for, validated before any model is loaded."""

    source: str
    output: Path
    adapters: tuple[str, ...]
    pipeline: list[Pass]
    target: str
    target_impl: Any
    input_shapes: dict[str, tuple[int, ...]] | None
    shape_ranges: dict[str, list[tuple[int, int, int]]] | None  # --input-shapes MIN-OPT-MAX dims (TensorRT profiles)
    verify: bool
    atol: float
    rtol: float
    dump_ir: Path | None
    calib: str | Path | None
    calib_data: str | None
    calib_method: str
    calib_samples: int | None
    trust_remote_code: bool
    task: str | None
    force: bool
    key: bytes | None
    say: Callable[[str], None]

    @property
    def lossy(self) -> bool:
        return not all(p.exact for p in self.pipeline)


@dataclass
class State:
    """What the stages have made so far."""

    job: Job
    started: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    src: Any = None  # effc.sources.Source
    calibration_doc: dict | None = None
    samples_in_data: int | None = None
    example: dict[str, torch.Tensor] | None = None
    captured: Any = None  # effc.capture.Captured
    program: Any = None  # the ExportedProgram, after the passes that ran so far
    report: CompileReport | None = None
    check_sets: list[dict[str, torch.Tensor]] = field(default_factory=list)  # the verification inputs
    eager: list[dict] = field(default_factory=list)  # eager PyTorch's outputs on each verification set
    graph: list[dict] | None = None  # lossy passes: the graph's after the passes, the artifact's reference
    ctx: PassContext | None = None
    decoder: dict | None = None  # effc.decoder.info for a text-generation-with-past compile
    tmp: Path | None = None  # the artifact being written; published or removed
    manifest: dict | None = None


@contextmanager
def _timed(s: State, name: str):
    """A stage's progress line and its seconds in report.stages."""
    s.job.say(f"effc: {name}...")
    t = time.perf_counter()
    yield
    s.stages[name] = time.perf_counter() - t


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
    shape_ranges: dict[str, list[tuple[int, int, int]]] | None = None,
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
    started = time.perf_counter()
    # Paths, passes and target: the same checks the CLI makes before it imports this module.
    pipeline = preflight.check_compile(source, adapters, passes, pass_config, target, calib, calib_data)
    key = load_key(sign_key) if sign_key is not None else None  # HMAC of the manifest's hash (README, Trust)
    target_impl = get_target(target)
    if verify:
        why = next(filter(None, (p.unverifiable(target_impl.column) for p in pipeline)), None)
        if why:
            raise EffcError(why)
    job = Job(source=source, output=Path(output), adapters=tuple(adapters), pipeline=pipeline, target=target,
              target_impl=target_impl, input_shapes=input_shapes, shape_ranges=shape_ranges, verify=verify, atol=atol, rtol=rtol,
              dump_ir=Path(dump_ir) if dump_ir else None, calib=calib, calib_data=calib_data,
              calib_method=calib_method, calib_samples=calib_samples, trust_remote_code=trust_remote_code,
              task=task, force=force,
              key=key, say=progress or _quiet)
    s = State(job, started=started)
    try:
        for stage in STAGES:
            s = stage(s)
    except BaseException:
        if s.tmp is not None:
            shutil.rmtree(s.tmp, ignore_errors=True)
        raise
    return s.report


def load(s: State) -> State:
    """The model (with adapters), the calibration file, the example inputs; each pass's prepare()."""
    job = s.job
    with _timed(s, "load"):
        s.src = sources.load(job.source, job.adapters, trust_remote_code=job.trust_remote_code, task=job.task)
        decoder.without_cache(s.src, job.target_impl, job.task)
        # Checked before the (slow) capture: a calibration file of another model is refused right away.
        if job.calib:
            s.calibration_doc = calibration.read(Path(job.calib), model_sha256=s.src.fingerprint)
        for p in job.pipeline:
            p.prepare(s.src)
        s.example = source_example(s.src, job.input_shapes)
        if s.src.task == decoder.TASK:
            s.decoder = decoder.info(s.src.model, s.src.config)
        if job.calib_data:  # before the capture
            s.samples_in_data = calibration.check_data(s.src, s.example, job.calib_data)
    return s


def capture(s: State) -> State:
    """torch.export of the model on the example inputs, with their dynamic dims."""
    with _timed(s, "capture"):
        s.captured = capture_source(s.src, s.example)
        s.program = s.captured.program
    s.report = CompileReport(source=s.src.describe(), target=s.job.target, nodes_captured=node_count(s.program),
                             param_bytes_captured=parameter_bytes(s.program), params_captured=parameter_count(s.program))
    return s


def calibrate(s: State) -> State:
    """Activation ranges measured on --calib-data (with --calib, they were read in load)."""
    job = s.job
    if not job.calib_data:
        return s
    with _timed(s, "calibrate"):
        s.calibration_doc = calibration.collect(s.src, s.program, s.example, job.calib_data, job.calib_method,
                                                job.calib_samples, total=s.samples_in_data)
    return s


def reference(s: State) -> State:
    """The verification inputs and eager PyTorch's outputs on them."""
    with _timed(s, "reference"):
        if s.decoder is not None:  # a prefill, two cached decode steps after it, and a long prefill
            shape = (2, int(s.example["input_ids"].shape[1]))
            long = min(s.decoder["max_positions"] or VERIFY_LENGTH, VERIFY_LENGTH)
            s.check_sets = decoder.verification_inputs(s.captured.module, s.decoder, shape, long)
        else:
            s.check_sets = _verification_inputs(s.example, s.src.config)
        s.eager = [run_torch(s.captured.module, feeds, s.captured.output_names) for feeds in s.check_sets]
    return s


def passes(s: State) -> State:
    """Each pass, instrumented; then the target's check that it can translate every effc op left, and for
    lossy passes the graph's outputs, which the artifact must reproduce."""
    job = s.job
    if job.dump_ir:
        job.dump_ir.mkdir(parents=True, exist_ok=True)
        (job.dump_ir / "00_captured.txt").write_text(str(s.program.graph_module.code))
    data = None
    if job.calib_data and any(p.reads_data() for p in job.pipeline):
        # For passes that read activations (GPTQ, AWQ) or measure accuracy (int8.auto_exclude) as they work.
        from effc import dataset

        stream = dataset.batches(job.calib_data, decoder.data_names(s.example),
                                 s.src.spec if s.src.kind == "hf_dir" else None, samples=job.calib_samples)
        data = list(decoder.filled(stream, s.example))
    s.ctx = PassContext(example_inputs=s.example, calibration=s.calibration_doc, source=s.src, log=job.say, data=data)
    for i, p in enumerate(job.pipeline, 1):
        job.say(f"effc: pass {p.name} ({i}/{len(job.pipeline)})...")
        s.program, record = run_pass(p, s.program, s.ctx, s.example, s.eager[0], s.captured.output_names)
        s.report.passes.append(record)
        if job.dump_ir:
            (job.dump_ir / f"{i:02d}_{p.name}.txt").write_text(str(s.program.graph_module.code))
    from effc.ops.registry import check_target

    check_target(s.program, job.target_impl)  # an op the target cannot translate: refused before anything is written
    if job.lossy:
        # The target must reproduce the transformed graph; what the passes cost against eager PyTorch is
        # the accuracy report (the artifact's, in verify; the graph's beside it), not a verification failure.
        s.graph = [run_torch(s.program.module(), feeds, s.captured.output_names) for feeds in s.check_sets]
        s.report.graph_accuracy_vs_eager = _accuracy(s.eager[0], s.graph[0], s.check_sets[0], "graph")
        if not job.verify:
            s.report.accuracy_not_measured = "--no-verify: the artifact was not run"
    return s


def run_pass(p: Pass, program, ctx: PassContext, example: dict, eager: dict, output_names: list[str]):
    """The pass instrument: run `p` and record its seconds, counts, node count and parameter bytes before
    and after, and the max |Δ| of the graph after it against eager PyTorch on the example inputs (every fx
    pass leaves a graph that runs in PyTorch). The new program and the record."""
    before_nodes, before_bytes = node_count(program), parameter_bytes(program)
    t = time.perf_counter()
    result = p.run(program, ctx)
    seconds = time.perf_counter() - t
    after = result.ir
    err = compare(eager, run_torch(after.module(), example, output_names), Tolerance(float("inf"), 0.0)).max_abs
    return after, PassRecord(p.name, p.config.to_dict(), seconds, result.changed, result.counts, before_nodes,
                             node_count(after), before_bytes, parameter_bytes(after), err, result.notes,
                             result.rules)


def build(s: State) -> State:
    """The target's files, switchable weight sets and calibration in a temporary directory next to -o,
    with a provisional manifest so the runtime can open it for verification."""
    job, src = s.job, s.src
    s.tmp = outdir.make_tmp(job.output)
    with _timed(s, f"build {job.target}"):
        job.target_impl.prepare(src, job.shape_ranges)
        built = job.target_impl.build(s.program, s.example, s.captured.output_names, s.captured.dynamic, s.tmp,
                                      overridable=frozenset(next(iter(s.ctx.weight_sets.values()), {})))
        weight_sets = _write_weight_sets(s.tmp, s.ctx.weight_sets)
        if s.calibration_doc is not None:
            calibration.write(s.tmp / "calibration.json", s.calibration_doc)
    s.report.ops = built.ops
    s.manifest = {
        "effc_version": effc.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": src.describe(),
        "passes": [{"name": p.name, "config": p.config.to_dict()} for p in job.pipeline],
        "target": {"name": job.target, **built.info},
        "runner": built.runner,
        "model_file": built.model_file,
        "inputs": [{**i, "name": decoder.public(i["name"])} for i in built.inputs],
        "outputs": built.outputs,
    }
    if s.decoder is not None:
        tokenizer = decoder.copy_tokenizer(src, s.tmp)
        s.manifest["decoder"] = {**s.decoder, "task": decoder.TASK, "tokenizer": tokenizer}
        if built.model_file.endswith(".onnx"):  # onnxruntime_genai.Model(artifact) loads it as it is
            from effc.runtime.kv_cache import shares_buffer
            from effc.targets import genai_config

            # Its generic "decoder" type: every input and output is named in the file, and genai 0.18 refuses
            # or misruns some families under their own type (mixtral refused, gpt2 "input not found").
            genai_config.write(s.tmp, s.manifest["decoder"], model_file=built.model_file,
                               shared_buffer=shares_buffer(s.manifest))
    if weight_sets:
        s.manifest["adapters"] = weight_sets
    requires = _requirements(job.pipeline)
    if requires:
        s.manifest["requires"] = requires  # checked by effc.runtime when the artifact is opened
    s.manifest["probes"] = built.probes  # layer -> the artifact's values at its input and output (effc debug)
    write_manifest(s.tmp, s.manifest)
    return s


def verify(s: State) -> State:
    """The artifact, run by effc.runtime on every verification set, against eager PyTorch (against the graph
    after the passes when they are lossy, under the lossy acceptance policy); the artifact's accuracy."""
    job, report = s.job, s.report
    if not job.verify:
        return s
    with _timed(s, "verify"):
        # A runner may say what verification should run (the tensorrt runner: model.onnx in ONNX Runtime).
        runner = runner_class(s.tmp, s.manifest)
        providers = runner.verification_providers() if hasattr(runner, "verification_providers") else None
        report.verification, outputs = _verify(s.tmp, s.check_sets, s.graph or s.eager, job.atol, job.rtol,
                                               s.eager if s.graph is not None else None, providers)
        if s.graph is not None:  # what the passes cost, measured on the artifact itself
            report.accuracy_vs_eager = _accuracy(s.eager[0], outputs[0], s.check_sets[0], "artifact")
        if s.ctx.weight_sets and report.verification["passed"]:
            report.verification["adapters"] = _verify_adapters(s.tmp, s.src, s.captured, s.check_sets[0],
                                                               job.atol, job.rtol)
            report.verification["passed"] = all(v["passed"] for v in report.verification["adapters"].values())
    if not report.verification["passed"]:
        raise VerificationError(_failure(report.verification, job.target, job.atol, job.rtol))
    return s


def publish(s: State) -> State:
    """report.json and the signed final manifest, then the directory renamed onto -o."""
    report = s.report
    report.artifact_bytes = sum(f.stat().st_size for f in s.tmp.rglob("*") if f.is_file())
    report.stages = {k: round(v, 3) for k, v in s.stages.items()}
    report.total_seconds = time.perf_counter() - s.started
    s.manifest["verification"] = report.verification
    (s.tmp / REPORT).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    write_manifest(s.tmp, s.manifest, sign_key=s.job.key)
    outdir.publish(s.tmp, s.job.output, s.job.force)
    return s


STAGES = (load, capture, calibrate, reference, passes, build, verify, publish)


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
        return (f"the {target} artifact fails {LOSSY.describe()}: output {v['output']} has SQNR "
                f"{v['artifact_sqnr_db_vs_eager']:.1f} dB against eager PyTorch where the graph after the passes has "
                f"{v['graph_sqnr_db_vs_eager']:.1f} dB{tail} (the runtime computes the quantized ops differently "
                "from their reference; --no-verify skips the check)")
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
    np_feeds = {decoder.public(k): v.numpy() for k, v in feeds.items()}
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


def _verify(artifact: Path, check_sets, references, atol: float, rtol: float, eager=None,
            providers: list[str] | None = None) -> tuple[dict, list[dict]]:
    """Run the artifact on every verification input set; report the worst set's per-output numbers, and
    the artifact's outputs on each set.

    With `eager` (lossy passes ran), `references` are the post-pass graph's outputs, and an output that
    misses them is judged by the lossy acceptance policy (effc.acceptance)."""
    from effc.runtime.session import Session

    results, shapes, gots, masks = [], [], [], []
    with Session(artifact, verify_hashes=False, providers=providers) as session:
        backend = session.backend
        for feeds, ref in zip(check_sets, references):
            np_feeds = {decoder.public(k): v.numpy() for k, v in feeds.items()}
            masks.append(np_feeds.get("attention_mask"))
            gots.append(session.run(np_feeds))
            results.append(compare(ref, gots[-1], Tolerance(atol, rtol), attention_mask=masks[-1]))
            shapes.append({k: list(v.shape) for k, v in np_feeds.items()})
    lossy = LOSSY.judge(results, eager, references, gots, masks) if eager is not None else []
    worst = max(results, key=lambda r: (not r.passed, r.max_abs))
    out = {**worst.to_dict(), "passed": all(r.passed for r in results), "max_abs": max(r.max_abs for r in results),
           "atol": atol, "rtol": rtol, "shapes": shapes, "backend": backend}
    if lossy:
        out["quantized_rounding"] = lossy
    return out, gots

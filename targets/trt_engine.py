"""TensorRT engines from trt artifacts, built on the machine that will run them (tensorrt and an NVIDIA GPU).

`effc build-engine ARTIFACT` writes engine.plan into the artifact and records, in the manifest's "engine"
entry, the TensorRT version, GPU name and compute capability it was built for: a plan runs only under the
TensorRT version that built it, on GPUs of the same compute capability (TensorRT's documented default,
without its version- and hardware-compatibility modes). The TensorRT runner (effc.runtime.tensorrt_runner)
uses the same internals to build and cache an engine when the artifact has none for the GPU it runs on.

Torch-free at import, and tensorrt is imported only when an engine is built, so the runtime can import
this module on any machine.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from effc.errors import EffcError

ENGINE = "engine.plan"
INSTALL = "pip install 'effc[gpu]' on a machine with an NVIDIA GPU and CUDA"


@dataclass(frozen=True)
class Host:
    """What an engine is tied to on the machine that builds or runs it."""

    tensorrt: str  # tensorrt.__version__, e.g. "10.9.0.34"
    gpu: str  # e.g. "NVIDIA H200"
    compute_capability: str  # e.g. "9.0"

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt} on {self.gpu} (compute capability {self.compute_capability})"


def host_missing() -> str | None:
    """What this machine lacks to build or run TensorRT engines, in one line with the fix; None when it
    has tensorrt and a CUDA GPU. torch is imported only after tensorrt is found (the GPU query), so a
    machine without tensorrt never imports torch here."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"tensorrt is not installed: {INSTALL}"
    try:
        import torch
    except ImportError:
        return ("torch is not installed (effc binds TensorRT's inputs and outputs as torch CUDA tensors): "
                "pip install torch")
    if not torch.cuda.is_available():
        return ("no CUDA GPU is visible (torch.cuda.is_available() is False): run on a machine with an NVIDIA GPU, "
                "its driver, and a CUDA build of torch")
    return None


def host() -> Host:
    """This machine's TensorRT version and GPU (device 0, the one torch uses by default)."""
    reason = host_missing()
    if reason is not None:
        raise EffcError(reason)
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return Host(trt.__version__, torch.cuda.get_device_name(), f"{major}.{minor}")


def engine_mismatch(entry: dict | None, here: Host) -> str | None:
    """Why the manifest's engine entry cannot run on `here` (one phrase), or None when it can. A plan
    deserializes only under the TensorRT version that built it and on the compute capability it was built
    for; another GPU model of the same capability would run it with tactics timed elsewhere, so the GPU
    name must match too."""
    if not entry:
        return "the artifact has no engine (run `effc build-engine` on this machine to add one)"
    built = Host(str(entry.get("tensorrt")), str(entry.get("gpu")), str(entry.get("compute_capability")))
    its = f"its {entry.get('file', ENGINE)} was built"
    if built.tensorrt != here.tensorrt:
        return f"{its} with TensorRT {built.tensorrt}, this machine has {here.tensorrt}"
    if built.compute_capability != here.compute_capability:
        return (f"{its} for compute capability {built.compute_capability} ({built.gpu}), this GPU is "
                f"{here.compute_capability} ({here.gpu})")
    if built.gpu != here.gpu:
        return f"{its} on {built.gpu}, this GPU is {here.gpu}"
    return None


def build_engine(artifact, timing_cache=None, sign_key=None, progress=print) -> dict:
    """Build ARTIFACT's engine here and write it into the artifact as engine.plan, the manifest re-hashed
    (and re-signed with `sign_key`, which a signed artifact requires) with an "engine" entry. Every check
    runs before anything is written; the plan is written whole (temporary file, then rename)."""
    from effc.runtime.manifest import SIGNATURE, read_manifest, write_manifest
    from effc.targets import trt_config

    root = Path(artifact)
    manifest = read_manifest(root, sign_key=sign_key)
    if manifest.get("runner") != "tensorrt":
        target = (manifest.get("target") or {}).get("name", "?")
        raise EffcError(f"{root} was compiled for --target {target}, not trt: TensorRT engines are built from trt "
                        f"artifacts; recompile it with `effc compile ... --target trt`")
    if SIGNATURE in manifest and sign_key is None:
        raise EffcError(f"{root} is signed: give its key with --sign-key (or EFFC_SIGN_KEY) so that the manifest "
                        "can be signed again after the engine is added")
    here = host()
    config = trt_config.read(root, manifest)
    cache = Path(timing_cache) if timing_cache is not None else root.resolve().parent / config["timing_cache"]
    start = time.perf_counter()
    plan = compile_plan(root, manifest, config, cache, progress)
    seconds = time.perf_counter() - start

    path = root / ENGINE
    had_engine = path.exists()
    write_atomic(path, plan)
    manifest["engine"] = {"file": ENGINE, "tensorrt": here.tensorrt, "gpu": here.gpu,
                          "compute_capability": here.compute_capability,
                          "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        write_manifest(root, manifest, sign_key)  # hashes every file, engine.plan included
    except OSError as e:
        if not had_engine:
            path.unlink(missing_ok=True)  # an unhashed engine.plan would make the artifact unopenable
        raise EffcError(f"could not rewrite {root}/manifest.json: {e.strerror or e}; "
                        "free space or fix permissions and run build-engine again") from None
    return {"file": ENGINE, "tensorrt": here.tensorrt, "gpu": here.gpu,
            "compute_capability": here.compute_capability, "seconds": seconds}


def compile_plan(root: Path, manifest: dict, config: dict, timing_cache: Path | None, progress=print) -> bytes:
    """The serialized engine of the artifact's model.onnx under its build configuration (trt_config.read):
    a strongly typed network (the graph's types decide each layer's precision), effc's plugins registered,
    one optimization profile per configured profile, the workspace limit, and the timing cache read from
    and written back to `timing_cache` (None: no cache)."""
    import onnx
    import tensorrt as trt

    from effc.runtime.manifest import artifact_file
    from effc.targets import trt_config, trt_plugins

    old = trt_config.version_ok(config, trt.__version__)
    if old is not None:
        raise EffcError(old)
    if not hasattr(trt, "Builder"):  # the lean and dispatch runtimes deserialize plans but cannot build them
        raise EffcError(f"this tensorrt ({trt.__version__}) is a runtime-only package that cannot build engines: "
                        "pip install tensorrt (the full package)")
    log = _Logger(trt, progress)
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    trt_plugins.register_with_tensorrt()
    parser = trt.OnnxParser(network, log)
    model_path = artifact_file(root, manifest, manifest["model_file"], "model_file")
    # The parser must take each plugin node as the plugin, never expand its reference function; the
    # path lets it find externally stored weights beside model.onnx.
    model = trt_plugins.without_functions(onnx.load(str(model_path), load_external_data=False))
    if not parser.parse(model.SerializeToString(), str(model_path)):
        raise EffcError(_parser_error(parser, model_path))

    build = builder.create_builder_config()
    build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config["workspace_bytes"]))
    build.builder_optimization_level = int(config["builder_optimization_level"])
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    for k, ranges in enumerate(config["profiles"]):
        unset = sorted(n for n, shape in inputs.items() if -1 in shape and n not in ranges)
        if unset:
            raise EffcError(f"{root}: TensorRT network input(s) {', '.join(unset)} are dynamic but profile {k} of "
                            f"{trt_config.FILE} gives them no range; recompile with --target trt")
        profile = builder.create_optimization_profile()
        for name, r in ranges.items():
            if name in inputs:  # an input the parser folded away (unused) takes no range
                profile.set_shape(name, r["min"], r["opt"], r["max"])
        build.add_optimization_profile(profile)
    if hasattr(trt, "IProgressMonitor"):
        build.progress_monitor = _Progress(trt, progress)
    if timing_cache is not None:
        _use_timing_cache(build, timing_cache, progress)

    progress(f"building the TensorRT engine of {root} ({trt.__version__}); this takes minutes")
    plan = builder.build_serialized_network(network, build)
    if plan is None:
        why = log.errors[0] if log.errors else "TensorRT gave no reason"
        raise EffcError(f"TensorRT could not build an engine for {root}: {why}")
    if timing_cache is not None:
        try:
            write_atomic(timing_cache, bytes(memoryview(build.get_timing_cache().serialize())))
        except OSError as e:  # the engine is built; a cache that cannot be saved only costs the next build time
            progress(f"could not save the timing cache {timing_cache}: {e.strerror or e}")
    return bytes(memoryview(plan))


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a temporary file beside it, renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _use_timing_cache(build, path: Path, progress) -> None:
    """Start from the timing cache at `path` when there is one and it fits this TensorRT and GPU; else
    from an empty one (written to `path` after the build)."""
    data = b""
    if path.is_file():
        data = path.read_bytes()
    cache = build.create_timing_cache(data)
    if not build.set_timing_cache(cache, False) and data:  # False: refuse a cache from another GPU or version
        progress(f"the timing cache {path} is from another GPU or TensorRT version; starting a new one")
        build.set_timing_cache(build.create_timing_cache(b""), False)


def _parser_error(parser, model_path: Path) -> str:
    err = parser.get_error(0)
    node = err.node_name() or f"#{err.node()}"
    more = f" ({parser.num_errors - 1} more)" if parser.num_errors > 1 else ""
    desc = " ".join(str(err.desc()).split())
    return (f"TensorRT's ONNX parser refused {model_path}: node {node} ({err.node_operator()}): {desc}{more}; "
            "the trt target should not have written this graph: report it with the artifact")


def _Logger(trt, progress):
    """A TensorRT logger that passes warnings and errors to `progress` and keeps the errors (the first
    one is the reason given when a build fails)."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= int(trt.ILogger.ERROR):
                self.errors.append(" ".join(str(msg).split()))
            if level <= int(trt.ILogger.WARNING):
                progress(f"tensorrt: {' '.join(str(msg).split())}")

    return Logger()


def _Progress(trt, progress):
    """TensorRT's build phases as progress lines: top-level phases only (the nested ones are many)."""

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.started[phase_name] = time.perf_counter()
                progress(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            if phase_name in self.started:
                progress(f"  {phase_name}: {time.perf_counter() - self.started.pop(phase_name):.1f} s")

    return Progress()


def slug(text: str) -> str:
    """`text` as a file-name part ("NVIDIA H200" -> "NVIDIA-H200")."""
    return re.sub(r"[^\w.]+", "-", text).strip("-") or "unknown"

"""The runner for trt artifacts. With tensorrt and a CUDA GPU it runs a TensorRT engine: the artifact's
engine.plan when it was built for this TensorRT version and GPU, else one built here and cached outside the
artifact (the artifact is never rewritten when it is opened). Elsewhere it runs the same model.onnx in ONNX
Runtime, the effc plugin nodes through their reference functions. `backend` says which ran, and why.

Without tensorrt this module imports neither tensorrt nor torch (effc.targets.trt_engine.host_missing)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np

from effc.errors import EffcError
from effc.runtime.manifest import artifact_file, sha256_file
from effc.targets import trt_config, trt_engine

ENGINE_PROVIDER = "TensorRT"  # in `providers`: the engine (the default where it can run); without it: ONNX Runtime
CACHE_ENV = "EFFC_ENGINE_CACHE"  # where engines built at open are kept; default $XDG_CACHE_HOME/effc/engines


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get(CACHE_ENV) or base / "effc" / "engines")


def cache_path(manifest: dict, here: trt_engine.Host) -> Path:
    """Where the engine built at open for this artifact's graph and build configuration, on this TensorRT
    and GPU, is cached: keyed by the hashes of model.onnx and trt_build.json (the same graph built with
    other profiles is another engine), the TensorRT version, compute capability and GPU name."""
    files = manifest["files"]
    key = hashlib.sha256(f"{files[manifest['model_file']]}:{files.get(trt_config.FILE, '')}".encode()).hexdigest()
    sm = here.compute_capability.replace(".", "")
    return cache_dir() / f"{key[:32]}-trt{here.tensorrt}-sm{sm}-{trt_engine.slug(here.gpu)}.plan"


def profile_index(root: Path, config: dict, shapes: dict[str, tuple]) -> int:
    """The optimization profile whose ranges hold these input shapes; refused in one line naming the
    input(s) outside every profile and the profiles' ranges."""
    index = trt_config.profile_for(config, shapes)
    if index is not None:
        return index
    outside = []
    for name, shape in shapes.items():
        ranges = [p[name] for p in config["profiles"] if name in p]
        if ranges and not any(len(shape) == len(r["min"]) and all(lo <= d <= hi for d, lo, hi in
                                                                  zip(shape, r["min"], r["max"])) for r in ranges):
            shown = " or ".join(f"{_dims(r['min'])}..{_dims(r['max'])}" for r in ranges)
            outside.append(f"{name} {_dims(shape)} (profiles: {shown})")
    what = "; ".join(outside) or "the inputs together fit no single profile " + "; ".join(
        f"{k}: " + ", ".join(f"{n} {_dims(r['min'])}..{_dims(r['max'])}" for n, r in p.items())
        for k, p in enumerate(config["profiles"]))
    raise EffcError(f"input shapes outside the TensorRT engine's optimization profiles of {root}: {what}; "
                    "pass shapes within them, or recompile with --input-shapes ranges that hold them")


def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


class TensorRTRunner:
    """`providers`: None runs the engine where tensorrt and a GPU are present, else ONNX Runtime; ["TensorRT"]
    the engine or an error saying what is missing; a list of ONNX Runtime providers (["CPUExecutionProvider"],
    what compile-time verification wants: the same numbers on every machine) ONNX Runtime with them."""

    # The class answers for its ONNX Runtime path: taps (the layer-wise debugger) run there even on a
    # TensorRT host, since an engine's intermediate values are fused away.
    taps: ClassVar[bool] = True

    @staticmethod
    def verification_providers() -> list[str]:
        """What effc.compile verifies a trt artifact with: its model.onnx in ONNX Runtime (the providers here,
        TensorRT's left out), the same numbers on every machine. On a TensorRT host the default path would
        build an engine during the compile and judge its TF32 numbers by fp32 tolerances."""
        from effc.runtime.onnxruntime_runner import available_providers

        return [p for p in available_providers() if p != "TensorrtExecutionProvider"]

    def __init__(self, root: Path, manifest: dict, threads: int | None = None, providers: list[str] | None = None,
                 taps: list[str] | tuple[str, ...] = (), verified: bool = False):
        self.root = Path(root)
        if taps:
            why = "the layer-wise debugger reads intermediate values, which only ONNX Runtime exposes"
        elif providers and ENGINE_PROVIDER not in providers:
            why = f"ONNX Runtime providers {', '.join(providers)} were asked for"
        else:
            why = trt_engine.host_missing()
            if why is not None and providers:  # TensorRT was asked for by name
                raise EffcError(f"providers ask for {ENGINE_PROVIDER}, but {why}")
        if why is not None:
            from effc.runtime.onnxruntime_runner import OrtRunner

            asked = [p for p in providers or () if p != ENGINE_PROVIDER] or None
            self._ort = OrtRunner(root, manifest, threads=threads, providers=asked, taps=taps, verified=verified)
            self._engine = None
            self.providers = self._ort.providers
            self.backend = f"onnxruntime {self.providers[0]} ({why})"
            return
        here = trt_engine.host()
        self.config = trt_config.read(self.root, manifest)
        self._ort = None
        self.taps = False  # the engine path: no intermediate values
        self.providers = [ENGINE_PROVIDER]
        entry = manifest.get("engine")
        mismatch = trt_engine.engine_mismatch(entry, here)
        if mismatch is None:
            self._engine = _Engine(self.root, self._artifact_plan(manifest, entry, verified), self.config)
            source = entry["file"]
        else:
            cached = cache_path(manifest, here)
            self._engine = None
            if cached.is_file():
                try:
                    self._engine = _Engine(self.root, cached.read_bytes(), self.config)
                except EffcError:  # a damaged cache entry is built again
                    cached.unlink(missing_ok=True)
            if self._engine is None:
                self._engine = _Engine(self.root, self._build(manifest, here, entry, mismatch, cached), self.config)
            source = f"engine built here, cached at {cached} ({mismatch})"
        self.backend = f"tensorrt {here.tensorrt} on {here.gpu}: {source}"

    def _artifact_plan(self, manifest: dict, entry: dict, verified: bool) -> bytes:
        path = artifact_file(self.root, manifest, entry["file"], "engine")
        if not verified and sha256_file(path) != manifest["files"][entry["file"]]:
            raise EffcError(f"artifact {self.root} was tampered with: sha256 of {entry['file']} does not match "
                            "manifest.json; run `effc build-engine` again")
        return path.read_bytes()

    def _build(self, manifest: dict, here: trt_engine.Host, entry: dict | None, mismatch: str, cached: Path) -> bytes:
        """An engine built here for the artifact, written to the cache (never into the artifact)."""
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Minutes of building: said once, not TensorRT's progress (a library should not narrate).
        print(f"effc: building a TensorRT engine for {self.root} on {here.gpu}, since {mismatch}; "
              f"caching it at {cached}", file=sys.stderr)
        try:
            plan = trt_engine.compile_plan(self.root, manifest, self.config, cached.parent / trt_config.TIMING_CACHE,
                                           progress=lambda line: None)
        except EffcError as e:
            if entry:  # an engine for elsewhere, and none can be built here
                raise EffcError(f"{self.root}: {mismatch}, and no engine could be built here ({e}); "
                                f"run `effc build-engine {self.root}` on a machine like this one") from None
            raise
        trt_engine.write_atomic(cached, plan)
        return plan

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._ort is not None:
            return self._ort.run(names, feeds)
        return self._engine.run(names, feeds)


class _Engine:
    """A deserialized engine with one execution context, run on torch CUDA tensors on its own stream."""

    def __init__(self, root: Path, plan: bytes, config: dict):
        import tensorrt as trt
        import torch

        self.root, self.config, self.torch = root, config, torch
        self._log = trt.Logger(trt.Logger.WARNING)  # held: TensorRT keeps a pointer to it
        self._runtime = trt.Runtime(self._log)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EffcError(f"TensorRT could not load the engine of {root} (damaged, or built by another "
                            f"TensorRT); run `effc build-engine {root}` again")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        self.profile: int | None = None

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch, ctx = self.torch, self.context
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise EffcError(f"the TensorRT engine of {self.root} takes {', '.join(missing)}, which were not fed")
        unknown = [n for n in names if n not in self.outputs]
        if unknown:
            raise EffcError(f"the TensorRT engine of {self.root} has no output {', '.join(unknown)} "
                            f"(its outputs: {', '.join(self.outputs)})")
        # Every fed input against the profiles, the ones TensorRT removed as unused too (the profiles name them).
        shapes = {n: tuple(np.shape(v)) for n, v in feeds.items()}
        profile = profile_index(self.root, self.config, shapes)
        with torch.cuda.stream(self.stream):
            if profile != self.profile:
                ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
                self.profile = profile
            held = {}  # the tensors must live until the stream has run
            for n in self.inputs:
                held[n] = torch.from_numpy(np.ascontiguousarray(feeds[n])).to("cuda", self.dtypes[n], non_blocking=True)
                ctx.set_input_shape(n, shapes[n])
                ctx.set_tensor_address(n, held[n].data_ptr())
            for n in self.outputs:
                shape = tuple(ctx.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise EffcError(f"output {n} of the TensorRT engine of {self.root} has a data-dependent shape "
                                    f"{list(shape)}, which this runner does not allocate; run it with ONNX Runtime")
                held[n] = torch.empty(shape, dtype=self.dtypes[n], device="cuda")
                ctx.set_tensor_address(n, held[n].data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise EffcError(f"TensorRT failed to run the engine of {self.root} (see its log above)")
        self.stream.synchronize()
        # numpy has no bfloat16: such outputs come back as float32 (the manifest check names the mismatch)
        return [(held[n].float() if held[n].dtype == torch.bfloat16 else held[n]).cpu().numpy() for n in names]


def torch_dtype(trt, torch, dtype):
    """The torch dtype of a TensorRT tensor type."""
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
             "FP8": torch.float8_e4m3fn}
    for name, value in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return value
    raise EffcError(f"TensorRT tensor type {dtype} has no torch equivalent for binding; run it with ONNX Runtime")

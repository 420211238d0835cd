"""The runner for ONNX artifacts (the onnx and ort targets): an ONNX Runtime session on model.onnx."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort

from effc.errors import EffcError
from effc.runtime.manifest import artifact_file

# Execution providers in order of preference; only those present in this onnxruntime build are used.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def available_providers() -> list[str]:
    have = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in have]


class OrtRunner:
    taps: ClassVar[bool] = True

    def __init__(self, root: Path, manifest: dict, threads: int | None = None, providers: list[str] | None = None,
                 taps: list[str] | tuple[str, ...] = (), verified: bool = False):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # switchable adapters are overridable initializers by design
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        # Idle spinning workers steal a core from whatever runs next (docs/ONNXRUNTIME.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # ORT fuses DequantizeLinear -> MatMul into MatMulNBits at accuracy level 4 by default, which
        # quantizes the activations to int8: not what the graph says (weight-only int8 lost 10x accuracy).
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if "optimization_level" in manifest["target"]:
            # The graph was optimized at build time, leaving out fusions slower on this CPU; optimizing it
            # again would fuse them back, run slower and round differently from what was verified.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.providers = providers or available_providers()
        model = artifact_file(root, manifest, manifest["model_file"], "model_file")
        try:
            self._session = ort.InferenceSession(_with_taps(model, taps) if taps else str(model), sess_options=opts,
                                                 providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise EffcError(f"onnxruntime could not load {model}: {str(e).splitlines()[0]}") from None

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(names, feeds)

    def shared_cache(self, pairs: dict[str, str], shape: tuple[int, ...], output: str) -> SharedCache | None:
        """The in-place cache on the CPU provider. None on a GPU one: there the buffers would have to live in
        device memory, which no test here can run (the caller concatenates instead)."""
        if self.providers[0] != "CPUExecutionProvider":
            return None
        return SharedCache(self._session, pairs, shape, output)


class SharedCache:
    """A decoder's KV cache as one zeroed buffer per past/present pair, bound as both (ORT IOBinding), so
    GroupQueryAttention writes each step's keys and values in place and no step copies the cache or
    returns it to Python (targets/kv_buffer.py builds graphs that take it). `run` returns `output` only."""

    def __init__(self, session: ort.InferenceSession, pairs: dict[str, str], shape: tuple[int, ...], output: str):
        self._session, self._io = session, session.io_binding()
        self._output = output
        self._io.bind_output(output)  # first bound, so get_outputs()[0]
        self._values = []  # the OrtValues borrow these arrays' memory: both stay alive with the binding
        for past, present in pairs.items():
            buffer = np.zeros(shape, dtype=np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            self._io.bind_ortvalue_input(past, value)
            self._io.bind_ortvalue_output(present, value)
            self._values.append((buffer, value))

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        for name, arr in feeds.items():
            self._io.bind_cpu_input(name, np.ascontiguousarray(arr))
        self._io.bind_output(self._output)  # unallocated again: its shape changes from prefill to decode
        self._session.run_with_iobinding(self._io)
        return self._io.get_outputs()[0].numpy()


def _with_taps(model: Path, taps) -> bytes:
    """The model with intermediate values (`taps`) as extra outputs, for the layer-wise debugger."""
    import onnx

    proto = onnx.load(str(model))
    have = {o.name for o in proto.graph.output}
    for name in taps:
        if name not in have:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return proto.SerializeToString()

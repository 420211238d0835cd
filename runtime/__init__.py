"""Run effc artifacts with the runner each manifest names (runtime/backends.py). ONNX artifacts need
numpy and onnxruntime only, never torch; `torch` target artifacts need the torch version they were
built with."""

from effc.runtime.session import Session, TensorInfo, open

__all__ = ["Session", "TensorInfo", "open"]

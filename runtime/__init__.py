"""Run effc artifacts. ONNX artifacts need numpy and onnxruntime only, never torch; `torch` target
artifacts need the torch version they were built with."""

from effc.runtime.session import Session, TensorInfo, available_providers, open

__all__ = ["Session", "TensorInfo", "available_providers", "open"]

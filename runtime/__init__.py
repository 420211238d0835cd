"""Run effc artifacts. Needs numpy and onnxruntime only, never torch."""

from effc.runtime.session import Session, TensorInfo, available_providers, open

__all__ = ["Session", "TensorInfo", "available_providers", "open"]

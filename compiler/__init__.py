"""effc: compile trained PyTorch models into smaller, faster, verified artifacts.

Imports are lazy so that `effc.runtime` (numpy + onnxruntime) never pulls in torch.
"""

__version__ = "0.1.0"
__all__ = ["compile", "__version__"]


def compile(*args, **kwargs):  # noqa: A001 - the product's verb
    """Compile a model into an artifact directory; see effc.pipeline.compile."""
    from effc.pipeline import compile as _compile

    return _compile(*args, **kwargs)

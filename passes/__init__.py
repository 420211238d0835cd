"""Graph passes. Each pass is one module; the registry maps names to them."""

from effc.passes.base import Level, Need, Pass, PassConfig, PassContext, PassResult
from effc.passes.registry import PASSES, pass_class, resolve

__all__ = ["Level", "Need", "Pass", "PassConfig", "PassContext", "PassResult", "PASSES", "pass_class", "resolve"]

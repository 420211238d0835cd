"""Which layers a weight-quantization pass rewrites: the annotate step shared by int8, nf4 and int4."""

from __future__ import annotations

import fnmatch

import torch

from effc.passes.program import module_name


def weights_by_node(signature, state_dict: dict) -> dict[str, torch.Tensor]:
    """Placeholder node name -> its parameter tensor."""
    return {s.arg.name: state_dict.get(s.target) for s in signature.input_specs if hasattr(s.arg, "name")}


def select(weights: dict, weight_arg, node: torch.fx.Node, exclude: tuple[str, ...],
           matched: set[str]) -> tuple[torch.Tensor | None, str | None]:
    """(weight, module name) of a layer to quantize; (None, name) when an exclude glob keeps it in float
    (the glob is added to `matched`); (None, None) when its weight is not a 2-D float parameter."""
    w = weights.get(getattr(weight_arg, "name", None))
    if w is None or w.dim() != 2 or not w.is_floating_point():
        return None, None
    name = module_name(node)
    hits = [p for p in exclude if fnmatch.fnmatchcase(name, p)]
    matched.update(hits)
    return (None, name) if hits else (w, name)


def unmatched_notes(pass_name: str, exclude: tuple[str, ...], matched: set[str]) -> list[str]:
    return [f"{pass_name}.exclude pattern {p!r} matched no layer" for p in exclude if p not in matched]


def replace(gm: torch.fx.GraphModule, node: torch.fx.Node, new: torch.fx.Node) -> None:
    """Put `new` in place of `node`, keeping its value and module meta (the debugger names layers by it)."""
    new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)

"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights before int8.

For linear layers reading one activation X, per input channel j:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),   X' = X / s,   W' = W * s,
so X' W'^T = X W^T exactly while X' has a flatter range that per-tensor int8 covers better (W absorbs
the range, and per-channel weight scales handle it). max|X_j| comes from calibration; layers that share
X (q/k/v, gate/up) share s, with max|W_j| taken over all of them.

1/s is folded into the norm that produces X when every reader of that norm is smoothed (pre-norm
decoders: Llama's RMSNorm weight, LayerNorm weight and bias); otherwise (BERT's post-norm residuals,
activations after GELU) X is multiplied by 1/s in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effc.passes.program import add_parameter, call, module_name

aten = torch.ops.aten


@dataclass
class Smoothed:
    weights: dict[torch.fx.Node, torch.Tensor]  # linear node -> W * s
    stats: dict[str, dict]  # layer name -> calibration stats of X / s
    folded: int = 0  # groups whose 1/s went into a norm
    explicit: int = 0  # groups that got a multiply in the graph


def factors(channel_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """The published formula; channels that are zero in X or in every W keep s = 1."""
    w_absmax = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0).double()
    x_absmax = channel_absmax.double()
    s = x_absmax.pow(alpha) / w_absmax.pow(1 - alpha)
    ok = (x_absmax > 0) & (w_absmax > 0)
    return torch.where(ok, s.clamp(min=1e-5), torch.ones_like(s))


def smooth(gm: torch.fx.GraphModule, signature, state_dict: dict, layers: dict[torch.fx.Node, tuple[str, torch.Tensor]],
           ranges: dict[str, dict], alpha: float) -> Smoothed:
    """Smooth every linear in `layers` (node -> (name, weight)) that has calibration stats."""
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node, (name, _) in layers.items():
        if name in ranges:
            groups.setdefault(node.args[0], []).append(node)
    out = Smoothed({}, {})
    for x, linears in groups.items():
        names = [layers[n][0] for n in linears]
        stats = ranges[names[0]]
        cabs = torch.tensor(stats["channel_absmax"], dtype=torch.float64)
        s = factors(cabs, [layers[n][1] for n in linears], alpha)
        for n in linears:
            out.weights[n] = (layers[n][1].detach().double() * s).float()
        # The smoothed range is the largest smoothed channel: smoothing flattens the outliers a clipping
        # calibration method would have cut, and the method's histogram was of the unsmoothed X.
        smoothed = cabs / s
        for name in names:
            out.stats[name] = {**ranges[name], "amax": float(smoothed.max()), "channel_absmax": smoothed.tolist()}
        if divide_input(gm, signature, state_dict, x, linears, s, f"{names[0]}.smoothquant"):
            out.folded += 1
        else:
            out.explicit += 1
    return out


def divide_input(gm, signature, state_dict, x: torch.fx.Node, linears: list[torch.fx.Node], s: torch.Tensor,
                 prefix: str) -> bool:
    """Make the linears read X / s (their weights are multiplied by s by the caller): folded into the
    norm producing X when only they read it (True), else a multiply in the graph (False)."""
    if _fold(gm, signature, state_dict, x, set(linears), s):
        return True
    inv = add_parameter(gm, signature, state_dict, f"{prefix}_inv_scale", (1 / s).float())
    with gm.graph.inserting_before(linears[0]):
        scaled = call(gm.graph, aten.mul.Tensor, (x, inv), linears[0])
    for n in linears:
        n.replace_input_with(x, scaled)
    return False


def _fold(gm, signature, state_dict, x: torch.fx.Node, readers: set[torch.fx.Node], s: torch.Tensor) -> bool:
    """Divide the producing norm's affine parameters by s, when only the smoothed linears read it."""
    if set(x.users) - readers:
        return False
    params = {spec.arg.name: spec.target for spec in signature.input_specs
              if spec.kind.name == "PARAMETER" and hasattr(spec.arg, "name")}
    if x.target is aten.layer_norm.default:
        slots = [i for i in (2, 3) if len(x.args) > i and getattr(x.args[i], "name", None) in params]
        if 2 not in slots:
            return False
    elif x.target is aten.mul.Tensor:  # RMSNorm: weight * normalized
        slots = [i for i in (0, 1) if getattr(x.args[i], "name", None) in params
                 and state_dict[params[x.args[i].name]].dim() == 1]
        if len(slots) != 1:
            return False
    else:
        return False
    args = list(x.args)
    for i in slots:
        value = state_dict[params[args[i].name]].detach().double() / s
        args[i] = add_parameter(gm, signature, state_dict, f"{module_name(x)}.smoothquant_{'bias' if i == 3 else 'weight'}",
                                value.float())
    x.args = tuple(args)
    return True

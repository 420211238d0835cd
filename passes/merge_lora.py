"""merge_lora: fold PEFT adapter layers into their base weights, on the captured graph.

Every PEFT layer effc folds (LoRA, rsLoRA, DoRA, IA3, several adapters on one layer) is, in eval
mode, an affine map of its input x: y = x W'^T + b'. The pass finds each layer's region of the graph
(the nodes torch.export tagged with a peft.tuners module in nn_module_stack), folds the subgraphs
that read only weights (DoRA's column norms, IA3's vectors) to constants, evaluates the rest
symbolically as an affine map of x, and replaces the region with one linear(x, W', b'):

    LoRA / rsLoRA   W' = W + s * B @ A          (s = alpha/r, or alpha/sqrt(r); read from the graph)
    several         W' = W + sum_i s_i B_i A_i
    DoRA            W' = m / ||W + s B A||_row * (W + s B A)
    IA3             W' = diag(l) W (k/v: output rows) or W diag(l) (feed-forward: input columns)

GPT-2's Conv1D (addmm with [in, out] weights) folds the same way. A region that is not affine in one
input (e.g. LoRA on an embedding) is left as it is, and the report says which and why.
Weighted combinations (`merge_lora.weights=0.7,0.3`) scale each adapter's delta before capture, so
the eager reference and the merged artifact compute the same weighted model.

Switchable mode (`merge_lora.mode=switchable`, LoRA/rsLoRA adapters) keeps the base weights shared and
one LoRA branch per layer, rewritten as x @ A_t @ B_t (scale folded into B_t, ranks zero-padded to the
largest). A_t/B_t become overridable ONNX initializers (graph inputs with the first adapter as default)
and every adapter is stored as its own small weight set; the runtime feeds the selected set with each
run, so switching adapters costs neither a recompile nor a new session. Per-run inputs, rather than
initializers swapped at session creation, because a session per adapter would hold N copies of the
base weights' prepacked buffers and make a switch cost a session start.

Ordering: quantization passes must see merged weights, so merge_lora runs before int8/int4/nf4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from effc.errors import EffcError
from effc.passes.base import Capability, Level, Pass, PassConfig, PassContext, PassResult
from effc.passes.cleanup import ASSERTS, _is_noop
from effc.passes.rewrite import GraphEdit, Rule, apply_rules

aten = torch.ops.aten
PEFT_PREFIX = "peft.tuners."
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}


@dataclass(frozen=True)
class MergeLoraConfig(PassConfig):
    mode: Literal["merge", "switchable"] = "merge"
    weights: tuple[float, ...] = ()  # merge mode, one per --adapter: the merged delta is sum_i weights[i] * delta_i


class NotAffine(Exception):
    """The region computes something that is not an affine map of its input; the message says what."""


class Affine:
    """y = x @ M^T + c over the last dim. M is None (identity), a vector (diagonal) or a matrix [out, in]."""

    def __init__(self, m: torch.Tensor | None, c: torch.Tensor | None, n_in: int):
        self.m, self.c, self.n_in = m, c, n_in

    @property
    def n_out(self) -> int:
        return self.n_in if self.m is None else self.m.shape[0]

    def dense(self) -> torch.Tensor:
        if self.m is None:
            return torch.eye(self.n_in, dtype=torch.float64)
        return torch.diag(self.m) if self.m.dim() == 1 else self.m

    def left(self, w: torch.Tensor) -> Affine:
        """w @ (this map): a linear layer applied after it."""
        w = w.double()
        if self.m is None:
            m = w
        elif self.m.dim() == 1:
            m = w * self.m[None, :]
        else:
            m = w @ self.m
        return Affine(m, None if self.c is None else w @ self.c, self.n_in)

    def scale(self, v: torch.Tensor) -> Affine:
        """Multiply every output feature by v (a scalar or a vector over the output features)."""
        v = v.double().reshape(-1)
        if v.numel() not in (1, self.n_out):
            raise NotAffine(f"multiplies by a tensor of {v.numel()} elements, not one per output feature")
        if self.m is None:
            m = v.expand(self.n_out).clone()
        elif self.m.dim() == 1:
            m = self.m * v
        else:
            m = self.m * v[:, None]
        return Affine(m, None if self.c is None else self.c * v, self.n_in)

    def plus(self, other: Affine) -> Affine:
        if other.n_in != self.n_in or other.n_out != self.n_out:
            raise NotAffine("adds maps of different shapes")
        if self.m is not None and other.m is not None and self.m.dim() == 1 and other.m.dim() == 1:
            m = self.m + other.m
        else:
            m = self.dense() + other.dense()
        c = self.c if other.c is None else (other.c if self.c is None else self.c + other.c)
        return Affine(m, c, self.n_in)

    def shift(self, b: torch.Tensor) -> Affine:
        b = b.double().reshape(-1)
        if b.numel() not in (1, self.n_out):
            raise NotAffine("adds a tensor that is not a bias over the output features")
        b = b.expand(self.n_out)
        return Affine(self.m, b if self.c is None else self.c + b, self.n_in)


def _peft_module(node: torch.fx.Node) -> tuple[str, str] | None:
    """(path, class) of the outermost PEFT layer this node was traced in, if any."""
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        if name.startswith(PEFT_PREFIX):
            return path, name
    return None


def _kind(nodes: list[torch.fx.Node], cls: str) -> str:
    classes = {c if isinstance(c, str) else c.__qualname__ for n in nodes
               for _, c in (n.meta.get("nn_module_stack") or {}).values()}
    if any("Dora" in c for c in classes):
        return "DoRA"
    return "IA3" if ".ia3." in cls else "LoRA" if ".lora." in cls else cls.rsplit(".", 1)[-1]


class _Evaluator:
    """Constant-folds weight-only subgraphs and evaluates a region as an affine map of its input."""

    def __init__(self, graph: torch.fx.Graph, weights: dict[str, torch.Tensor]):
        self.weights = weights  # placeholder name -> tensor
        self.consts: dict[torch.fx.Node, object] = {}
        # Nodes computed from weights alone, found in one pass in graph order (no deep recursion later).
        self.constant: set[torch.fx.Node] = set()
        for node in graph.nodes:
            if node.op == "placeholder" and node.name in weights:
                self.constant.add(node)
            elif (node.op == "call_function" and node.target not in ASSERTS
                  and not isinstance(node.meta.get("val"), torch.SymInt)
                  and all(a in self.constant for a in node.all_input_nodes)):
                self.constant.add(node)

    def const(self, node) -> object:
        """The value of a node that depends on weights only; raises NotAffine when it depends on inputs."""
        if not isinstance(node, torch.fx.Node):
            return node
        if node not in self.constant:
            raise NotAffine(f"{node.name} depends on a model input")
        if node not in self.consts:
            if node.op == "placeholder":
                self.consts[node] = self.weights[node.name]
            else:
                args = torch.fx.node.map_arg(node.args, self.const)
                kwargs = torch.fx.node.map_arg(node.kwargs, self.const)
                with torch.no_grad():
                    self.consts[node] = node.target(*args, **kwargs)
        return self.consts[node]

    def region(self, nodes: list[torch.fx.Node], x: torch.fx.Node) -> dict[torch.fx.Node, object]:
        in_region = set(nodes)
        n_in = x.meta["val"].shape[-1]
        values: dict[torch.fx.Node, object] = {x: Affine(None, None, int(n_in))}

        def value(a):
            if isinstance(a, torch.fx.Node) and a in values:
                return values[a]
            if isinstance(a, torch.fx.Node) and a in in_region:
                raise NotAffine(f"{a.name} was not evaluated")
            return self.const(a)

        for node in nodes:
            if node.target in ASSERTS:
                continue
            args = [value(a) if isinstance(a, torch.fx.Node) else a for a in node.args]
            if not any(isinstance(a, Affine) for a in args):
                values[node] = self.const(node)
                continue
            values[node] = self._step(node, args)
        return values

    @staticmethod
    def _step(node: torch.fx.Node, args: list) -> Affine:
        t = node.target
        if _is_noop(node):
            return args[0]
        if t is aten.linear.default:
            h, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else None
            if not isinstance(h, Affine) or isinstance(w, Affine):
                raise NotAffine("linear whose weight depends on the input")
            out = h.left(w)
            return out if bias is None else out.shift(bias)
        if t is aten.addmm.default and isinstance(args[1], Affine) and not isinstance(args[2], Affine):
            return args[1].left(args[2].t()).shift(args[0])
        if t is aten.mm.default and isinstance(args[0], Affine) and not isinstance(args[1], Affine):
            return args[0].left(args[1].t())
        if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            a, b = args
            if isinstance(a, Affine) and isinstance(b, Affine):
                raise NotAffine("multiplies the input by itself")
            h, v = (a, b) if isinstance(a, Affine) else (b, a)
            if t in (aten.div.Tensor, aten.div.Scalar):
                if h is not a:
                    raise NotAffine("divides by the input")
                v = 1.0 / torch.as_tensor(v, dtype=torch.float64)
            return h.scale(torch.as_tensor(v))
        if t in (aten.add.Tensor, aten.sub.Tensor):
            a, b = args[0], args[1]
            alpha = node.kwargs.get("alpha", 1) * (-1 if t is aten.sub.Tensor else 1)
            if isinstance(b, Affine):
                b = b.scale(torch.tensor(float(alpha)))
            elif not isinstance(b, Affine):
                b = torch.as_tensor(b) * alpha
            if isinstance(a, Affine) and isinstance(b, Affine):
                return a.plus(b)
            return a.shift(b) if isinstance(a, Affine) else b.shift(torch.as_tensor(a))
        if t is aten.neg.default:
            return args[0].scale(torch.tensor(-1.0))
        if t in VIEWS or t in (aten.unsqueeze.default, aten.squeeze.dim):
            src, out = node.args[0].meta.get("val"), node.meta.get("val")
            if src is not None and out is not None and out.shape[-1] == src.shape[-1]:
                return args[0]  # only leading dims change: the per-row map is the same
            raise NotAffine(f"{node.name} reshapes the feature dimension")
        raise NotAffine(f"{node.name} ({t}) is not affine")


class MergeLora(Pass[MergeLoraConfig]):
    name = "merge_lora"
    level = Level.FX
    config_class = MergeLoraConfig
    summary = "fold LoRA/rsLoRA/DoRA/IA3 adapters (weighted, several at once) into the base weights"
    provides = frozenset({Capability.MERGED_WEIGHTS})

    def prepare(self, source) -> None:
        """Merge mode: apply merge_lora.weights to the adapters' scaling before capture (eager and graph
        alike). Switchable mode: keep the first adapter active and collect every adapter's factors."""
        if self.config.mode == "switchable":
            self._collect_switchable(source)
            return
        weights = self.config.weights
        if not weights:
            return
        names = [a["name"] for a in source.adapters]
        if len(weights) != len(names):
            raise EffcError(f"merge_lora.weights has {len(weights)} values for {len(names)} --adapter directories; "
                            "give one weight per adapter")
        scaled = 0
        for module in source.model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and hasattr(module, "lora_A"):
                for name, w in zip(names, weights):
                    if name in scaling:
                        scaling[name] *= w
                        scaled += 1
        if not scaled:
            raise EffcError("merge_lora.weights applies to LoRA adapters; none of the given adapters is LoRA")

    def _collect_switchable(self, source) -> None:
        names = [a["name"] for a in source.adapters]
        if not names:
            raise EffcError("merge_lora.mode=switchable needs at least one --adapter")
        if self.config.weights:
            raise EffcError("merge_lora.weights combines adapters in merge mode; switchable mode keeps them apart")
        self.adapter_names = names
        self.factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # path -> adapter -> (A, s*B)
        for path, module in source.model.named_modules():
            cls = f"{type(module).__module__}.{type(module).__qualname__}"
            if not cls.startswith(PEFT_PREFIX):
                continue
            dora = getattr(module, "lora_magnitude_vector", None)
            if ".lora." not in cls or (dora is not None and len(dora)) or not hasattr(module, "lora_A"):
                raise EffcError(f"merge_lora.mode=switchable supports LoRA and rsLoRA adapters; {path} is "
                                f"{type(module).__name__}{' (DoRA)' if dora else ''}: merge it instead")
            if "lora_A" in dict(module.named_children()) and any(n not in module.lora_A for n in names):
                missing = [n for n in names if n not in module.lora_A]
                raise EffcError(f"switchable adapters must target the same modules: {path} has no LoRA from "
                                f"adapter(s) {', '.join(missing)}")
            self.factors["model." + path] = {
                n: (module.lora_A[n].weight.detach().clone(), module.lora_B[n].weight.detach() * module.scaling[n])
                for n in names}
            module.set_adapter(names[0])

    def run(self, ep, ctx: PassContext) -> PassResult:
        if self.config.mode == "switchable":
            return self._run_switchable(ep, ctx)
        edit = GraphEdit(ep, self.name)
        graph = edit.graph
        weights = {}  # constants too: IA3 vectors and DoRA norms may be captured as constant tensors
        for spec in edit.signature.input_specs:
            if hasattr(spec.arg, "name") and spec.target is not None:
                value = edit.state_dict.get(spec.target, edit.constants.get(spec.target))
                if isinstance(value, torch.Tensor):
                    weights[spec.arg.name] = value
        regions: dict[str, list[torch.fx.Node]] = {}
        classes: dict[str, str] = {}
        for node in graph.nodes:
            found = _peft_module(node) if node.op == "call_function" else None
            if found:
                regions.setdefault(found[0], []).append(node)
                classes[found[0]] = found[1]
        evaluator = _Evaluator(graph, weights)
        first = {nodes[0]: path for path, nodes in regions.items()}  # a region is a candidate at its first node
        plans: dict[str, tuple] = {}
        counts: dict[str, int] = {}
        notes: list[str] = []

        def affine(edit: GraphEdit, node: torch.fx.Node) -> str | None:
            path = first[node]
            try:
                plans[path] = self._plan(evaluator, regions[path])
            except NotAffine as e:
                counts["layers left unmerged"] = counts.get("layers left unmerged", 0) + 1
                notes.append(f"{path} ({_kind(regions[path], classes[path])}) left unmerged: {e}")
                return str(e)
            return None

        def merge(edit: GraphEdit, node: torch.fx.Node) -> None:
            path = first[node]
            self._merge(edit, path, regions[path], *plans[path])
            kind = _kind(regions[path], classes[path])
            counts[f"{kind} layers merged"] = counts.get(f"{kind} layers merged", 0) + 1

        apply_rules(edit, [Rule("merge", lambda n: n in first, merge, affine)])
        graph.eliminate_dead_code()
        return edit.finish(counts, notes, changed=bool(regions), dropped="weights dropped (adapters and replaced bases)")

    def _run_switchable(self, ep, ctx: PassContext) -> PassResult:
        """Rewrite each LoRA branch linear(linear(x, A), B) * s as matmul(matmul(x, A_t), B_t)."""
        edit = GraphEdit(ep, self.name)
        graph = edit.graph
        targets = {n.name: s.target for s in edit.signature.input_specs for n in graph.nodes
                   if n.op == "placeholder" and hasattr(s.arg, "name") and s.arg.name == n.name}
        first = self.adapter_names[0]
        sets: dict[str, dict[str, object]] = {n: {} for n in self.adapter_names}
        for path, factors in self.factors.items():
            a_target = f"{path}.lora_A.{first}.weight"
            la = next((n for n in graph.nodes if n.target is aten.linear.default
                       and targets.get(getattr(n.args[1], "name", None)) == a_target), None)
            if la is None or len(la.users) != 1:
                raise EffcError(f"switchable: the LoRA branch of {path} was not found in the captured graph")
            (lb,) = la.users
            end = lb
            if len(lb.users) == 1 and next(iter(lb.users)).target in (aten.mul.Tensor, aten.mul.Scalar):
                end = next(iter(lb.users))  # the scale, folded into B_t
            rank = max(a.shape[0] for a, _ in factors.values())
            padded = {}
            for name, (a, b) in factors.items():
                a_t = torch.zeros(a.shape[1], rank, dtype=a.dtype)
                a_t[:, : a.shape[0]] = a.t()
                b_t = torch.zeros(rank, b.shape[0], dtype=b.dtype)
                b_t[: b.shape[1]] = b.t()
                padded[name] = (a_t, b_t)
            a_node = edit.add_parameter(f"{path}.lora_A_t", padded[first][0].contiguous())
            b_node = edit.add_parameter(f"{path}.lora_B_t", padded[first][1].contiguous())
            for name, (a_t, b_t) in padded.items():
                sets[name][f"{path}.lora_A_t"] = a_t.numpy()
                sets[name][f"{path}.lora_B_t"] = b_t.numpy()
            with graph.inserting_before(end), edit.made_by("switchable"):
                down = graph.call_function(aten.matmul.default, (la.args[0], a_node))
                up = graph.call_function(aten.matmul.default, (down, b_node))
            with la.args[0].meta["val"].fake_mode:
                down.meta["val"] = aten.matmul.default(la.args[0].meta["val"], a_node.meta["val"])
                up.meta["val"] = aten.matmul.default(down.meta["val"], b_node.meta["val"])
            for node in (down, up):
                node.meta["nn_module_stack"] = la.meta.get("nn_module_stack", {})
            end.replace_all_uses_with(up)
            for node in dict.fromkeys([end, lb, la]):
                graph.erase_node(node)
            edit.count("switchable")
        graph.eliminate_dead_code()
        counts = {"LoRA layers made switchable": edit.rules["merge_lora/switchable"], "adapters": len(sets)}
        ctx.weight_sets.update(sets)
        return edit.finish(counts, changed=True, dropped="weights dropped")

    @staticmethod
    def _plan(evaluator: _Evaluator, nodes: list[torch.fx.Node]) -> tuple[torch.fx.Node, torch.fx.Node, Affine]:
        """(input, output, affine map) of a region, or NotAffine saying why it cannot be merged."""
        in_region = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in in_region
                  and isinstance(a.meta.get("val"), torch.Tensor) and a not in evaluator.constant}
        outputs = [n for n in nodes if any(u not in in_region for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            raise NotAffine(f"has {len(inputs)} inputs and {len(outputs)} outputs, not one of each")
        (x,), (out,) = inputs, outputs
        if not x.meta["val"].is_floating_point():
            raise NotAffine("its input is not a float tensor (embedding lookups are not folded)")
        affine = evaluator.region(nodes, x)[out]
        if not isinstance(affine, Affine) or affine.m is None:
            raise NotAffine("computes no linear layer")
        return x, out, affine

    @staticmethod
    def _merge(edit: GraphEdit, path: str, nodes: list[torch.fx.Node], x: torch.fx.Node, out: torch.fx.Node,
               affine: Affine) -> None:
        """Replace the region by one linear(x, W', b')."""
        dtype = out.meta["val"].dtype
        w_node = edit.add_parameter(_free_name(edit.state_dict, f"{path}.weight"), affine.dense().to(dtype).contiguous())
        b_node = None
        if affine.c is not None:
            b_node = edit.add_parameter(_free_name(edit.state_dict, f"{path}.bias"), affine.c.to(dtype).contiguous())
        with edit.graph.inserting_before(out):
            linear = edit.graph.call_function(aten.linear.default, (x, w_node) + ((b_node,) if b_node is not None else ()))
        fake = x.meta["val"].fake_mode
        with fake:
            linear.meta["val"] = aten.linear.default(x.meta["val"], w_node.meta["val"],
                                                     *([b_node.meta["val"]] if b_node is not None else []))
        stack = out.meta.get("nn_module_stack") or {}
        linear.meta["nn_module_stack"] = {k: v for k, v in stack.items() if not v[0].startswith(path + ".")}
        out.replace_all_uses_with(linear)
        for node in reversed(nodes):
            if not node.users:
                edit.graph.erase_node(node)


def _free_name(state_dict: dict, name: str) -> str:
    i, candidate = 1, name
    while candidate in state_dict:
        candidate, i = f"{name}_{i}", i + 1
    return candidate

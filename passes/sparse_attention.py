"""sparse_attention: each attention (scaled_dot_product_attention and its mask) becomes one
effc::window_attention, whose targets compute only the keys its pattern allows (O(S * window)).

Exact mode (the default): only where the model itself attends through a band. The config says which
layers have a sliding window (sliding_window with layer_types / use_sliding_window), and the mask
subgraph of each such layer, evaluated at probe lengths past the window and with a left-padded row,
must equal band(window) & causal & attention_mask; then the rewrite changes no output. Layers the config
calls global, or whose mask is anything else, stay dense.

Approximate mode (`pattern=window|dilated|longformer|bigbird|blockwise`): any attention whose mask is
dense causal or dense bidirectional plus padding gets the pattern instead, which changes the numbers; the
pipeline then reports the accuracy against eager like any lossy pass. `window` is the span of positions
a query covers on each side (itself included); with `dilation` d it sees every d-th of them.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch.export.graph_signature import InputKind

import effc.ops  # noqa: F401  (registers effc::window_attention)
from effc.errors import EffcError
from effc.ops.window_attention import allowed_mask
from effc.passes.base import Level, Pass, PassConfig, PassContext, PassResult
from effc.passes.sdpa import SDPA, arguments, shape, through_repeat
from effc.passes.program import module_name
from effc.passes.rewrite import GraphEdit, Rule, apply_rules
from effc.targets.window_attention_onnx import block_rows

_aten = torch.ops.aten
Pattern = Literal["exact", "window", "dilated", "longformer", "bigbird", "blockwise"]


@dataclass(frozen=True)
class SparseAttentionConfig(PassConfig):
    pattern: Pattern | None = None  # None: exact, and a model with no windowed attention is only a note
    window: int | None = None  # span each side, the query included (approximate patterns)
    dilation: int = 1  # dilated: every d-th position of the window (d must divide window)
    global_tokens: tuple[int, ...] = ()  # positions that see and are seen by every token (0: [CLS])
    block: int = 64  # bigbird / blockwise: block size
    random_blocks: int = 2  # bigbird: random key blocks per query block
    seed: int = 0  # bigbird: the random blocks' seed
    layers: tuple[str, ...] = ()  # globs over attention module names (e.g. model.layers.[0-3].*); empty: all

    def __post_init__(self):
        approximate = self.pattern not in (None, "exact")
        if self.window is not None and self.window <= 0:
            raise EffcError(f"sparse_attention.window={self.window} must be a positive number of positions")
        if self.dilation < 1:
            raise EffcError(f"sparse_attention.dilation={self.dilation} must be >= 1")
        if self.block <= 0 or self.random_blocks < 0:
            raise EffcError("sparse_attention.block must be > 0 and random_blocks >= 0")
        if any(g < 0 for g in self.global_tokens):
            raise EffcError(f"sparse_attention.global_tokens={','.join(map(str, self.global_tokens))}: positions "
                            "must be >= 0")
        if not approximate and (self.window is not None or self.dilation != 1 or self.global_tokens):
            raise EffcError("sparse_attention: window/dilation/global_tokens are for an approximate pattern; the "
                            "exact mode takes the window from the model (set sparse_attention.pattern=window|...)")
        if self.pattern in ("window", "dilated", "longformer") and self.window is None:
            raise EffcError(f"sparse_attention.pattern={self.pattern} needs sparse_attention.window=N")
        if self.pattern == "dilated" and self.dilation < 2:
            raise EffcError("sparse_attention.pattern=dilated needs sparse_attention.dilation=D >= 2")
        if self.window is not None and self.window % self.dilation:
            raise EffcError(f"sparse_attention.dilation={self.dilation} does not divide window={self.window}: the "
                            "window spans whole dilation steps (window = keys per side x dilation)")


def layer_windows(config) -> dict[int, int | None]:
    """Decoder layer index -> its sliding window (None: global attention), from a transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None) or 0
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    window = int(window) if isinstance(window, int) and window > 0 else None
    kinds = getattr(text, "layer_types", None)
    return {i: window if kinds is None or kinds[i] == "sliding_attention" else None for i in range(count)}


def _layer_index(name: str) -> int | None:
    found = re.search(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


class _Probe:
    """The mask subgraph of one SDPA as a function of (batch, past, new, key validity)."""

    def __init__(self, ep, mask: torch.fx.Node):
        needed, seen = [], set()

        def walk(n):
            if isinstance(n, torch.fx.Node) and n not in seen:
                seen.add(n)
                for a in n.all_input_nodes:
                    walk(a)
                needed.append(n)
        walk(mask)
        graph, env = torch.fx.Graph(), {}
        for n in needed:
            env[n] = graph.node_copy(n, lambda x: env[x])
        graph.output(env[mask])
        self.module = torch.fx.GraphModule(ep.graph_module, graph)
        self.inputs = [n for n in needed if n.op == "placeholder"]
        kinds = {s.arg.name: s for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
        self.fixed = {}
        for n in self.inputs:
            spec = kinds.get(n.name)
            if spec is not None and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                self.fixed[n.name] = ep.state_dict[spec.target]
            elif spec is not None and spec.kind == InputKind.CONSTANT_TENSOR:
                self.fixed[n.name] = ep.constants[spec.target]
        self.uses_padding = any(n.name == "attention_mask" for n in self.inputs)

    def feeds(self, batch: int, past: int, new: int, valid: torch.Tensor) -> list | None:
        out = []
        for n in self.inputs:
            val = n.meta.get("val")
            if n.name in self.fixed:
                out.append(self.fixed[n.name])
            elif n.name == "attention_mask":
                out.append(valid.to(val.dtype))
            elif n.name.startswith("past_key_values"):
                out.append(torch.zeros(batch, val.shape[1], past, val.shape[3], dtype=val.dtype))
            elif n.name == "position_ids":
                out.append(torch.arange(past, past + new).expand(batch, new).contiguous())
            elif n.name == "cache_position":
                out.append(torch.arange(past, past + new))
            elif isinstance(val, torch.Tensor) and val.ndim in (2, 3) and not val.dtype.is_floating_point:
                out.append(torch.zeros(batch, new, *val.shape[2:], dtype=val.dtype))
            else:
                return None  # an input the probe cannot make up
        return out

    def allowed(self, batch: int, past: int, new: int, valid: torch.Tensor) -> torch.Tensor | None:
        """The mask as bool [B, 1, S, T] (True = attend), or None when it is not a plain mask."""
        feeds = self.feeds(batch, past, new, valid)
        if feeds is None:
            return None
        with torch.no_grad():
            mask = self.module(*feeds)
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != 1:
            return None
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask < -1e30)).all()):
                return None  # an additive bias (ALiBi, relative positions): not a mask
            mask = mask == 0
        return mask.expand(batch, 1, new, past + new)


def _probe_cases(window: int, cached: bool) -> list[tuple[int, int]]:
    """(past, new) lengths past the window: a long prefill, and with a cache a decode step and a chunk."""
    long = 2 * window + 5
    return [(0, long), (0, 3)] + ([(long, 1), (window + 2, 4)] if cached else [])


def _matches(probe: _Probe, cached: bool, window: int | None, causal: bool) -> bool:
    """Whether the mask is band(window) (None: dense) & causal & attention_mask at every probe length."""
    span = window if window is not None else 64
    for past, new in _probe_cases(span, cached):
        total = past + new
        valid = torch.ones(2, total, dtype=torch.bool)
        valid[1, :min(3, total - 1)] = False  # a left-padded row
        got = probe.allowed(2, past, new, valid)
        if got is None:
            return False
        expect = allowed_mask(2, new, total, valid if probe.uses_padding else None,
                              window if window is not None else total + 1, causal, 1, [], 0, None)
        if not torch.equal(got, expect):
            return False
    return True


class SparseAttention(Pass[SparseAttentionConfig]):
    name = "sparse_attention"
    level = Level.FX
    config_class = SparseAttentionConfig
    summary = "attention through windows: exact on sliding-window models, or a window/dilated/longformer/bigbird " \
              "pattern"

    @property
    def exact(self) -> bool:  # an approximate pattern changes the numbers on purpose
        return self.config.pattern in (None, "exact")

    def run(self, ep, ctx: PassContext) -> PassResult:
        c = self.config
        edit = GraphEdit(ep, self.name)
        cached = any(n.op == "placeholder" and n.name.startswith("past_key_values") for n in edit.graph.nodes)
        config = getattr(ctx.source, "config", None)
        windows = layer_windows(config) if config is not None else {}
        positions = _max_positions(config)
        notes: list[str] = []
        if self.exact and not any(windows.values()):
            if c.pattern == "exact":
                raise EffcError("sparse_attention.pattern=exact: this model has no windowed attention (no "
                                "sliding_window in its config); give an approximate pattern "
                                "(sparse_attention.pattern=window sparse_attention.window=N) or drop the pass")
            notes.append("sparse_attention: the model attends densely in every layer (no sliding_window): nothing "
                         "to rewrite exactly")
            return edit.finish({"rewritten": 0}, notes, changed=False, dropped=None)
        if not self.exact:
            self._check_positions(positions, ctx)
        probes: dict[torch.fx.Node, _Probe] = {}

        def plan(node) -> tuple[int, bool, int, list[int], int, torch.Tensor | None] | str:
            """(window, causal, dilation, globals, block, layout) for the op, or why not."""
            q, k, v, mask, dropout, is_causal, _, gqa = arguments(node)
            name = module_name(node)
            if c.layers and not any(fnmatch.fnmatchcase(name, g) for g in c.layers):
                return "not in sparse_attention.layers"
            if dropout or gqa:
                return "dropout or enable_gqa"
            qs, ks = shape(q), shape(through_repeat(k))
            if qs is None or len(qs) != 4 or ks is None or not all(isinstance(x, int) for x in (qs[1], ks[1], qs[3])):
                return "q/k not 4D with static heads"
            if qs[1] % ks[1] or shape(through_repeat(v))[1] != ks[1]:
                return "head counts not multiples"
            if isinstance(mask, torch.fx.Node):
                probes[node] = probe = probes.get(node) or _Probe(ep, mask)
            elif mask is not None:
                return "mask is not a tensor"
            if self.exact:
                window = windows.get(_layer_index(name))
                if window is None:
                    return "a global (dense) layer"
                if mask is None or not _matches(probe, cached, window, True):
                    return "the mask is not the config's sliding window & causal & padding"
                return window, True, 1, [], 0, None
            if mask is None:
                causal = bool(is_causal)
            elif _matches(probe, cached, None, True):
                causal = True
            elif _matches(probe, cached, None, False):
                causal = False
            else:
                return "the mask is not dense causal or dense bidirectional (+ padding)"
            return self._pattern(causal, positions)

        plans: dict[torch.fx.Node, tuple] = {}

        def check(edit_, node):
            result = plan(node)
            if isinstance(result, str):
                return result
            plans[node] = result
            return None

        def rewrite(edit_, node):
            q, k, v, mask, _, _, scale, _ = arguments(node)
            window, causal, dilation, globals_, block, layout = plans[node]
            valid = None
            if node in probes and probes[node].uses_padding:
                am = next(n for n in edit_.graph.nodes if n.op == "placeholder" and n.name == "attention_mask")
                valid = edit_.call(_aten.ne.Scalar, (am, 0))
            layout_node = None
            if layout is not None:
                layout_node = edit_.add_parameter(f"sparse_attention_layout_{node.name}", layout)
            if scale is None:
                scale = shape(q)[3] ** -0.5
            return edit_.call(torch.ops.effc.window_attention.default,
                              (q, through_repeat(k), through_repeat(v), valid, window, causal, dilation,
                               globals_ or None, block, layout_node, float(scale)), node)

        done = apply_rules(edit, [Rule("window" if self.exact else c.pattern, lambda n: n.op == "call_function"
                                       and n.target == SDPA, rewrite, check)])
        edit.graph.eliminate_dead_code()
        refused = {reason: len(nodes) for reason, nodes in edit.refused.items()}
        counts = {"rewritten": done, **{f"left dense: {r}": n for r, n in refused.items()}}
        if plans:
            window, causal, dilation, globals_, block, layout = next(iter(plans.values()))
            notes.append(_break_even(window, causal, dilation, globals_, block, layout))
        if not done:
            notes.append("sparse_attention: no attention matched; left dense: "
                         + ", ".join(f"{n} ({r})" for r, n in refused.items()))
        return edit.finish(counts, notes, changed=done > 0, dropped=None)

    def _check_positions(self, positions: int | None, ctx: PassContext) -> None:
        c = self.config
        if positions is not None:
            bad = [g for g in c.global_tokens if g >= positions]
            if bad:
                raise EffcError(f"sparse_attention.global_tokens={','.join(map(str, bad))} out of range: the model "
                                f"takes at most {positions} positions")
        info = getattr(ctx.source, "task", None) and _decoder_window(ctx.source)
        if info:
            need = max(c.window or 0, c.block * 3 if c.pattern in ("bigbird", "blockwise") else 0)
            if c.global_tokens or c.pattern in ("bigbird", "blockwise") or need - 1 > info:
                raise EffcError(f"sparse_attention.pattern={c.pattern} needs keys older than the {info} positions "
                                "this model's KV cache keeps (its sliding window): use a window <= the model's, "
                                "without global tokens or blocks, or --task text-generation")

    def _pattern(self, causal: bool, positions: int | None) -> tuple:
        c = self.config
        if c.pattern in ("window", "dilated", "longformer"):
            globals_ = list(c.global_tokens) if c.pattern == "longformer" or c.global_tokens else []
            if c.pattern == "longformer" and not globals_:
                globals_ = [0]
            return c.window // c.dilation, causal, c.dilation, globals_, 0, None
        # block patterns: a [QB, KB] layout over the longest input the model takes
        blocks = -(-(positions or 4096) // c.block)
        qb = torch.arange(blocks)[:, None]
        kb = torch.arange(blocks)[None, :]
        if c.pattern == "blockwise":
            layout = qb == kb
            return 0, causal, 1, list(c.global_tokens), c.block, layout
        # bigbird: its block and both neighbours, `random_blocks` random others per query block, and the
        # first block's tokens global (BigBird's ITC form)
        layout = (qb - kb).abs() <= 1
        gen = torch.Generator().manual_seed(c.seed)
        for row in range(blocks):
            layout[row, torch.randperm(blocks, generator=gen)[:c.random_blocks]] = True
        globals_ = sorted(set(c.global_tokens) | set(range(min(c.block, positions or c.block))))
        return 0, causal, 1, globals_, c.block, layout


def _max_positions(config) -> int | None:
    if config is None:
        return None
    from effc.inputs import max_positions

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return max_positions(text)


def _decoder_window(source) -> int | None:
    """The past a decoder's generate keeps when every layer is windowed (decoder.cache_window), else None."""
    from effc import decoder

    if source.task != decoder.TASK:
        return None
    return decoder.info(source.model, source.config)["cache_window"]


def _break_even(window: int, causal: bool, dilation: int, globals_: list[int], block: int, layout) -> str:
    """The cost model's answer to "from what length does this pay": keys each query reads in the blocked
    lowering against the S keys of a dense attention (per query, the same work per key)."""
    if layout is not None:
        per_query = block * int(layout.sum(1).float().mean()) + len(globals_)
        return (f"sparse_attention: a block layout reads ~{per_query} keys per query in effc's torch kernel (dense "
                f"reads S; the onnx/ort lowering of a layout is dense): faster from ~{per_query} tokens")
    rows = block_rows(window)
    back = -(-(window - 1) // rows)
    per_query = (back + 1 + (0 if causal else back)) * rows + len(globals_)
    return (f"sparse_attention: each query reads {per_query} keys in the blocked lowering (window {window}"
            f"{f' x dilation {dilation}' if dilation > 1 else ''}), a dense attention reads all S: it pays from about "
            f"S = {per_query} tokens, and cuts attention work S/{per_query}-fold beyond (benchmarks/long_attention.py)")

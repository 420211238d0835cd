"""Capture a model with torch.export (non-strict) into an ExportedProgram with named outputs."""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass

import torch
from torch.export import Dim, ExportedProgram

from effc.errors import CaptureError


class NamedOutputs(torch.nn.Module):
    """Calls the model with named inputs and returns its tensor outputs as a flat tuple.

    HF models return ModelOutput objects (and caches); the artifact's outputs are the tensors by name.
    forward gets an explicit signature (input_ids, attention_mask, ...) because torch.export names
    graph inputs and matches dynamic_shapes by parameter name.
    """

    def __init__(self, model: torch.nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        bad = [n for n in input_names if not n.isidentifier()]
        if bad:
            raise CaptureError(f"input names must be Python identifiers, got {bad}")
        self.model = model
        self.input_names = input_names
        self.output_names = output_names
        self.forward = _with_signature(self._forward, input_names)

    def _forward(self, inputs: dict):
        out = self.model(**inputs)
        return tuple(_named_tensors(out)[n] for n in self.output_names)


def _with_signature(call, names: list[str]):
    namespace = {"call": call}
    exec(f"def forward({', '.join(names)}):\n    return call(dict({', '.join(f'{n}={n}' for n in names)}))", namespace)
    return namespace["forward"]


def _named_tensors(out) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise CaptureError(f"the model returned {type(out).__name__}; effc needs tensors, a tuple of them or a ModelOutput")


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Settings that make HF models exportable: no KV cache outputs, an exportable MoE implementation."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    # transformers 5's default grouped_mm experts export to an opaque custom op (docs/ONNXRUNTIME.md).
    if hasattr(model, "set_experts_implementation") and getattr(config, "num_local_experts", 0):
        model.set_experts_implementation("batched_mm")
    return model.eval()


@dataclass
class Captured:
    program: ExportedProgram
    module: NamedOutputs  # the eager model with the same inputs and outputs as the program
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[str, dict[int, str]]


def _where(exc: BaseException) -> str:
    """The innermost frame in model code (not torch internals), to name what failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename and __file__ != f.filename]
    if frames:
        f = frames[-1]
        return f" at {f.filename.split('site-packages/')[-1]}:{f.lineno} ({f.name})"
    m = re.search(r'File "([^"]+)", line (\d+)', str(exc))
    return f" at {m.group(1).split('site-packages/')[-1]}:{m.group(2)}" if m else ""


def _export(wrapper, inputs, shapes) -> ExportedProgram:
    from effc.exportable_attention import exportable

    with torch.no_grad(), exportable(wrapper):
        return torch.export.export(wrapper, (), dict(inputs), dynamic_shapes=shapes, strict=False)


def _capture_error(e: Exception) -> CaptureError:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    first = " ".join(lines[:2]) if lines else type(e).__name__
    hint = ("; the model fixes a dim that effc made dynamic: try other --input-shapes"
            if "Constraints violated" in first or "specialized" in first else "; report the model and op")
    return CaptureError(f"torch.export failed{_where(e)}: {type(e).__name__}: {first[:400]}{hint}")


def named_module(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[NamedOutputs, dict]:
    """The prepared eager model wrapped with named inputs and outputs, and its outputs (numpy) on
    `inputs`: one eager run tells the output names and gives the values."""
    model = prepare(model)
    with torch.no_grad():
        named = _named_tensors(model(**inputs))
    wrapper = NamedOutputs(model, list(inputs), list(named)).eval()
    return wrapper, {k: v.detach().cpu().numpy() for k, v in named.items()}


def capture(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
            dynamic: dict[str, dict[int, str]], wrapper: torch.nn.Module | None = None) -> Captured:
    """`wrapper`: a module with input_names / output_names that calls the model (effc.decoder.WithPast);
    by default NamedOutputs."""
    from effc.decoder import TOTAL

    if wrapper is None:
        wrapper, _ = named_module(model, inputs)
    output_names = wrapper.output_names
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if any(TOTAL in axes.values() for axes in dynamic.values()):
        limit = None  # a bounded sequence beside the derived total makes torch.export guard them apart
    dims: dict[str, Dim] = {}

    def dim(name: str):
        if name == TOTAL:  # past + new: torch.export derives its relation to the other dims
            return Dim.AUTO
        return dims.setdefault(name, Dim(name, max=limit) if name == "sequence" and limit else Dim(name))

    shapes = {name: {axis: dim(d) for axis, d in axes.items()} for name, axes in dynamic.items()}
    try:
        program = _export(wrapper, inputs, shapes)
    except torch._dynamo.exc.UserError as e:
        if "Suggested fixes" not in str(e):
            raise _capture_error(e) from e
        # The model bounds a dim (e.g. a position table): take torch's own suggested range and retry once.
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

        try:
            program = _export(wrapper, inputs, refine_dynamic_shapes_from_suggested_fixes(str(e), shapes))
        except Exception as e2:
            raise _capture_error(e2) from e2
    except Exception as e:
        raise _capture_error(e) from e
    return Captured(program, wrapper, list(inputs), output_names, dynamic)


def run_torch(module, inputs: dict[str, torch.Tensor], output_names: list[str]) -> dict:
    """Outputs by name as numpy arrays, from an eager module or an ExportedProgram's module()."""
    with torch.no_grad():
        values = module(**inputs)
    return {n: v.detach().cpu().numpy() for n, v in zip(output_names, values)}


def source_example(src, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """The example inputs to capture a loaded effc.sources.Source with: a decoder's carry its past."""
    from effc import decoder
    from effc.inputs import example_inputs

    example = example_inputs(src.model, src.config, shapes, src.example_inputs)
    if src.task == decoder.TASK:
        example = decoder.example_inputs(decoder.info(src.model, src.config), tuple(example["input_ids"].shape))
    return example


def capture_source(src, example: dict[str, torch.Tensor]) -> Captured:
    """torch.export of a loaded Source: a causal LM with its KV cache (effc.decoder) unless --task said not."""
    from effc import decoder
    from effc.inputs import dynamic_dims

    if src.task == decoder.TASK:
        wrapper = decoder.WithPast(prepare(src.model), decoder.info(src.model, src.config)["layers"])
        return capture(src.model, example, decoder.dynamic_dims(list(example)), wrapper)
    return capture(src.model, example, dynamic_dims(example))

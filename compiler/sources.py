"""Where a model comes from: a Hugging Face directory, PEFT adapters on top, or a module:callable factory."""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from effc.errors import EffcError
from effc.preflight import model_problem
from effc.runtime.manifest import sha256_tree


@dataclass
class Source:
    """A loaded model in eval mode, with what is needed to describe and reload it."""

    spec: str
    kind: str  # "hf_dir" or "factory"
    model: torch.nn.Module
    sha256: str
    config: object | None = None  # transformers PretrainedConfig when there is one
    adapters: list[dict] = field(default_factory=list)
    example_inputs: dict[str, torch.Tensor] | None = None  # given by a factory
    trust_remote_code: bool = False  # the user allowed the model directory's own code (--trust-remote-code)
    task: str | None = None  # effc.decoder.TASK: captured with its KV cache

    @property
    def fingerprint(self) -> str:
        """sha256 of the model as it runs: the base and every adapter applied to it."""
        import hashlib

        return hashlib.sha256("".join([self.sha256] + [a["sha256"] for a in self.adapters]).encode()).hexdigest()

    def describe(self) -> dict:
        from effc.inputs import max_positions

        return {"spec": self.spec, "kind": self.kind, "sha256": self.sha256, "adapters": self.adapters,
                "path": str(Path(self.spec).resolve()) if self.kind == "hf_dir" else None,
                "vocab_size": getattr(self.config, "vocab_size", None),
                "max_positions": max_positions(self.config)}  # the runtime refuses longer sequences


def _state_sha256(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + b"\0" + t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# --task NAME -> the transformers Auto class that loads the model with that head.
TASKS: dict[str, str] = {
    "feature-extraction": "AutoModel",
    "text-generation": "AutoModelForCausalLM",  # one forward, no cache
    "text-generation-with-past": "AutoModelForCausalLM",  # the default for causal LMs (effc.decoder)
    "fill-mask": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}


def _model_class(path: Path, config, raw: dict, task: str | None, trust_remote_code: bool):
    """The class to load with: --task's Auto class, else the custom code's (auto_map, trusted), else the
    class `architectures` names. An architecture transformers does not have is refused, not guessed."""
    import transformers

    if task is not None:
        return getattr(transformers, TASKS[task])
    auto_map = raw.get("auto_map") if trust_remote_code else None
    if isinstance(auto_map, dict):
        custom = [k for k in auto_map if k.startswith("AutoModel") and hasattr(transformers, k)]
        return getattr(transformers, custom[0] if custom else "AutoModel")
    archs = getattr(config, "architectures", None) or []
    known = [getattr(transformers, a) for a in archs if hasattr(transformers, a)]
    if known:
        return known[0]
    if archs:
        raise EffcError(f"{path}/config.json names architecture {', '.join(archs)}, which transformers "
                        f"{transformers.__version__} does not have; give --task ({', '.join(TASKS)}) to load it "
                        "with that head, or upgrade transformers")
    return transformers.AutoModel


def _refuse_custom_code(path: Path, raw: dict) -> None:
    """A config.json with auto_map asks to import .py files from the model directory: refused, never asked."""
    auto_map = raw.get("auto_map")
    if auto_map:
        names = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
        raise EffcError(f"{path} comes with its own model code (auto_map in config.json: {names}), which effc "
                        "does not run; read that code, and pass --trust-remote-code if you trust it")


def _load_hf_dir(path: Path, trust_remote_code: bool = False, task: str | None = None):
    import transformers

    problem = model_problem(str(path))  # no config.json, or no safetensors weights
    if problem:
        raise EffcError(problem)
    raw = read_json(path / "config.json")
    if not isinstance(raw, dict):
        raise EffcError(f"{path}/config.json is not a JSON object; give a Hugging Face model directory")
    if not trust_remote_code:
        _refuse_custom_code(path, raw)
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise EffcError(f"{path}/config.json could not be read by transformers: {str(e).splitlines()[0]}") from None
    cls = _model_class(path, config, raw, task, trust_remote_code)
    try:
        model = cls.from_pretrained(path, use_safetensors=True, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise EffcError(f"could not load {path} as {cls.__name__}: {str(e).splitlines()[0]}") from None
    return model, config


def _load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    # Like uvicorn/gunicorn: a factory in the current project is importable without installing it.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EffcError(f"cannot import module {module_name!r} for {spec}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise EffcError(f"{spec}: module {module_name} has no callable {attr!r}")
    made = factory()
    model, example = (made if isinstance(made, tuple) else (made, None))
    if not isinstance(model, torch.nn.Module):
        raise EffcError(f"{spec} returned {type(model).__name__}; a factory returns an nn.Module or (module, example_inputs dict)")
    return model, getattr(model, "config", None), example


def load(spec: str, adapters: list[str] | tuple[str, ...] = (), *, trust_remote_code: bool = False,
         task: str | None = None) -> Source:
    """Load a model by spec ("path/to/hf_dir" or "module:callable") with adapters applied, in eval mode.

    Code shipped in a model directory (config.json's auto_map) runs only with trust_remote_code; `task`
    (a key of TASKS) picks the head instead of config.json's `architectures`."""
    if task is not None and task not in TASKS:
        raise EffcError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise EffcError(f"{spec} is a file, not a model directory; give the directory that holds config.json")
        model, config = _load_hf_dir(path, trust_remote_code, task)
        source = Source(spec, "hf_dir", model, sha256_tree(path), config, trust_remote_code=trust_remote_code)
    elif ":" in spec and not spec.startswith((".", "/")):
        if task is not None:
            raise EffcError(f"--task applies to a Hugging Face model directory; {spec} is a factory, which builds its own model")
        model, config, example = _load_factory(spec)
        source = Source(spec, "factory", model, _state_sha256(model), config, example_inputs=example)
    else:
        raise EffcError(f"{spec}: no such model directory (give a Hugging Face model directory or module:callable)")
    from effc.decoder import check_task

    source.task = check_task(task, source.model)
    if adapters:
        from effc.adapters import apply_adapters

        source.model, source.adapters = apply_adapters(source.model, [Path(a) for a in adapters])
    source.model.eval()
    return source


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EffcError(f"cannot read {path}: {e}") from None

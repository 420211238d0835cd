"""The checks of what the user typed that need neither a model nor torch, so that a mistake is answered at once.

effc.compile runs them before it loads anything, and the CLI runs them before it imports the compiler
(importing torch alone takes seconds): a missing model or adapter directory, an unknown pass or target,
a missing calibration file, a malformed --input-shapes. Every problem found is reported together, in
one line. Nothing here imports torch, transformers or a pass module, and nothing is written.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from effc.errors import EffcError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def model_problem(spec: str) -> str | None:
    """Why `spec` cannot be a model (a Hugging Face model directory or module:callable), or None."""
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            return f"{spec} is a file, not a model directory; give the directory that holds config.json"
        if not (path / "config.json").is_file():
            return (f"{path} is not a model directory: no config.json (give a Hugging Face model directory with "
                    "config.json and *.safetensors, or a module:callable factory)")
        if not any(path.glob("*.safetensors")):
            pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            hint = (f"; it has {', '.join(pickled)}, which effc will not unpickle: convert it to safetensors with a "
                    "tool you trust" if pickled else "")
            return f"{path} has no *.safetensors weights{hint}"
        return None
    if ":" in spec and not spec.startswith((".", "/")):
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            return f"{spec} is not module:callable (for example examples.models:tiny_gpt2)"
        # As sources.load does: a factory in the current project is importable without installing it.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            found = importlib.util.find_spec(module_name)  # imports the parent packages only
        except (ImportError, ValueError) as e:
            return f"cannot import module {module_name!r} for {spec}: {e}"
        if found is None:
            return f"cannot import module {module_name!r} for {spec}: No module named {module_name!r}"
        return None
    return f"{spec}: no such model directory (give a Hugging Face model directory or module:callable)"


def adapter_problem(adapter_dir: str | Path) -> str | None:
    """Why `adapter_dir` is not a PEFT adapter directory effc can load (safetensors only), or None."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        return f"adapter {adapter_dir}: no such directory"
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        return f"adapter {adapter_dir} is not a PEFT adapter directory: no {ADAPTER_CONFIG}"
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        hint = (" (adapter_model.bin is pickled; effc does not unpickle: save it with safe_serialization=True)"
                if (adapter_dir / "adapter_model.bin").exists() else "")
        return f"adapter {adapter_dir} has no {ADAPTER_WEIGHTS}{hint}"
    return None


def data_problem(data: str | Path) -> str | None:
    """Why `data` (text, .jsonl, .npz or a directory of them) cannot be read as samples, or None."""
    return None if Path(data).exists() else f"calibration data {data}: no such file or directory"


def source_problems(spec: str, adapters: list[str] | tuple[str, ...] = ()) -> list[str]:
    return [p for p in [model_problem(spec), *map(adapter_problem, adapters)] if p]


def check_source(spec: str, adapters: list[str] | tuple[str, ...] = (), data: str | Path | None = None) -> None:
    """For the commands that load a model (golden record, calibrate, debug): its paths, before torch."""
    problems = source_problems(spec, adapters) + [p for p in [data_problem(data) if data is not None else None] if p]
    if problems:
        raise EffcError("; ".join(problems))


def check_compile(source: str, adapters: list[str] | tuple[str, ...] = (), passes: list[str] | tuple[str, ...] = (),
                  pass_config: list[str] | tuple[str, ...] = (), target: str = "ort",
                  calib: str | Path | None = None, calib_data: str | Path | None = None) -> list:
    """Everything about a compile that can be checked before a model is loaded; the resolved passes.

    The problems found without importing torch are reported first (all of them, together); then the
    passes' config keys and values, needs and ordering are checked with the pass classes (registry.resolve).
    """
    from effc.passes.base import Need
    from effc.passes.registry import name_problems, resolve
    from effc.targets.base import PASS_DEFAULTS, TARGETS

    problems = source_problems(source, adapters) + name_problems(passes, pass_config)
    if target not in TARGETS:
        problems.append(f"unknown target {target!r}; targets: {', '.join(sorted(TARGETS))}")
    if calib and calib_data:
        problems.append("give --calib FILE or --calib-data DATA, not both")
    if calib and not Path(calib).is_file():
        problems.append(f"--calib {calib}: no such file (make one with `effc calibrate`)")
    problems += [p for p in [data_problem(calib_data) if calib_data else None] if p]
    if problems:
        raise EffcError("; ".join(problems))
    have = ({Need.EXAMPLE_INPUTS} | ({Need.CALIBRATION} if calib or calib_data else set())
            | ({Need.CALIBRATION_DATA} if calib_data else set()))
    implied = {name: settings for name, settings in PASS_DEFAULTS.get(target, {}).items() if name in passes}
    items = [f"{name}.{k}={v}" for name, settings in implied.items() for k, v in settings.items()]
    notes = {name: f"--target {target} implies " + ", ".join(f"{name}.{k}={v}" for k, v in settings.items())
             for name, settings in implied.items()}
    return resolve(list(passes), items + list(pass_config), have=have, notes=notes)


def _parse_dims(text: str | None) -> dict[str, list[tuple[int, ...]]]:
    """'input_ids:1-4-8x128' -> {'input_ids': [(1, 4, 8), (128,)]}: each dim N or MIN-OPT-MAX."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        name, _, dims = item.partition(":")
        try:
            parsed = [tuple(int(v) for v in dim.split("-")) for dim in dims.lower().split("x")]
        except ValueError:
            parsed = []
        if not name or not parsed or not all(len(d) in (1, 3) and d[0] >= 1 and list(d) == sorted(d) for d in parsed):
            raise EffcError(f"--input-shapes: {item!r} is not name:DIMxDIM with each DIM N or MIN-OPT-MAX, "
                            "MIN <= OPT <= MAX (for example input_ids:1x128 or input_ids:1-1-8x1-128-512)")
        shapes[name] = parsed
    return shapes


def parse_shapes(text: str | None) -> dict[str, tuple[int, ...]]:
    """'input_ids:1x128,attention_mask:1x128' -> {'input_ids': (1, 128), ...}: the example inputs' shapes (a
    MIN-OPT-MAX dim gives OPT)."""
    return {name: tuple(d[len(d) // 2] for d in dims) for name, dims in _parse_dims(text).items()}


def parse_shape_ranges(text: str | None) -> dict[str, list[tuple[int, int, int] | None]]:
    """The TensorRT profile ranges in --input-shapes: one (MIN, OPT, MAX) per dim, or None for a plain N
    (the example's size only; the profile keeps its default range for that dim)."""
    return {name: [d if len(d) == 3 else None for d in dims] for name, dims in _parse_dims(text).items()}

"""The one table of passes: name -> class path, imported only when used."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Literal

from effc.errors import EffcError
from effc.passes.base import Need, Pass

PASSES: dict[str, str] = {
    "cleanup": "effc.passes.cleanup:Cleanup",
    "merge_lora": "effc.passes.merge_lora:MergeLora",
    "int8": "effc.passes.int8:Int8",
    "nf4": "effc.passes.nf4:Nf4",
    "int4": "effc.passes.int4:Int4",
    "fp16": "effc.passes.half:Fp16",
    "bf16": "effc.passes.half:Bf16",
    "sparse_attention": "effc.passes.sparse_attention:SparseAttention",
}


HOW_TO_GIVE = {Need.CALIBRATION: ": give --calib FILE (from `effc calibrate`) or --calib-data DATA",
               Need.CALIBRATION_DATA: ": give --calib-data DATA (a calibration file holds ranges, not samples)"}


def _unknown(name: str) -> str:
    return f"unknown pass {name!r}; passes: {', '.join(sorted(PASSES))} (see `effc passes`)"


def pass_class(name: str) -> type[Pass]:
    if name not in PASSES:
        raise EffcError(_unknown(name))
    module, _, attr = PASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def parse_pass_config(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, str]]:
    """['int8.mode=static', ...] -> {'int8': {'mode': 'static'}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not eq or not dot or not name or not field:
            raise EffcError(f"--pass-config {item!r} is not pass.key=value (for example cleanup.remove_asserts=false)")
        out.setdefault(name, {})[field] = value
    return out


def name_problems(names: list[str] | tuple[str, ...], config_items: list[str] | tuple[str, ...] = ()) -> list[str]:
    """What is wrong with --passes and --pass-config that the table alone shows (no pass module is imported):
    unknown or repeated names, pass.key=value syntax, config for a pass that is not in --passes."""
    problems = [_unknown(name) for name in dict.fromkeys(names) if name not in PASSES]
    if len(set(names)) != len(names):
        problems.append(f"--passes lists a pass twice: {','.join(names)}")
    try:
        configs = parse_pass_config(config_items)
    except EffcError as e:
        return problems + [str(e)]
    problems += [f"--pass-config sets {name}.*, but {name} is not in --passes" for name in configs if name not in names]
    return problems


def resolve(names: list[str], config_items: list[str] | tuple[str, ...] = (),
            have: set[Need] = frozenset({Need.EXAMPLE_INPUTS}), notes: dict[str, str] | None = None) -> list[Pass]:
    """Validate the whole pipeline before any work: names, config keys and values, needs, ordering.
    `notes`: pass name -> why its config is what it is (a target's implied settings), said with its needs.

    Every problem found is reported together in one message; problems with the names (name_problems)
    are reported first, on their own, because finding them imports no pass module.
    """
    problems = name_problems(names, config_items)
    if problems:  # answered before any pass module (and with it torch) is imported
        raise EffcError("; ".join(problems))
    configs = parse_pass_config(config_items)
    passes: list[Pass] = []
    for name in names:
        try:
            cls = pass_class(name)
            passes.append(cls(cls.config_class.from_strings(name, configs.get(name, {}))))
        except EffcError as e:
            problems.append(str(e))
    for i, p in enumerate(passes):
        for later in passes[i + 1:]:
            for capability in sorted(p.expects & later.provides, key=lambda c: c.value):
                problems.append(f"pass {p.name} must run after {later.name}, which provides {capability.value}: "
                                f"write --passes ...,{later.name},{p.name},...")
        missing = p.needs() - set(have)
        for need in sorted(missing, key=lambda n: n.value):
            why = f" ({notes[p.name]})" if notes and p.name in notes else ""
            problems.append(f"pass {p.name} needs {need.value}{why}, which was not given" + HOW_TO_GIVE.get(need, ""))
    if problems:
        raise EffcError("; ".join(problems))
    return passes


def needs_by_setting(cls: type[Pass]) -> dict[Need, list[str]]:
    """What the pass needs beyond its default config, and the settings that bring each need, found by asking
    needs() with each setting changed: int8 -> {calibration: [mode=static, outlier_threshold, smoothquant_alpha]}."""
    default = cls()
    base = default.needs()
    hints = typing.get_type_hints(cls.config_class)
    found: dict[Need, dict[str, list[str]]] = {}
    for f in dataclasses.fields(cls.config_class):
        for label, value in _probes(hints[f.name], getattr(default.config, f.name)):
            try:
                needs = cls(dataclasses.replace(default.config, **{f.name: value})).needs()
            except Exception:  # noqa: BLE001 - a value the pass refuses brings no need
                continue
            for need in needs - base:
                found.setdefault(need, {}).setdefault(f.name, []).append(label)
    return {need: [f"{key}={'|'.join(labels)}" if labels != [None] else key for key, labels in by_key.items()]
            for need, by_key in found.items()}


def _probes(hint, default) -> list[tuple[str | None, object]]:
    """Values unlike the default to try for one config field: (label, value); label None for "any value"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return [(str(a), a) for a in args if a != default]
    if hint is bool:
        return [(str(not default).lower(), not default)]
    if default is None and args and type(None) in args:
        member = next(a for a in args if a is not type(None))
        sample = typing.get_args(member)[0] if typing.get_origin(member) is Literal else {int: 1, float: 1.0}.get(member, "x")
        return [(None, sample)]
    return []

"""The one table of passes: name -> class path, imported only when used."""

from __future__ import annotations

import importlib

from effc.errors import EffcError
from effc.passes.base import Need, Pass

PASSES: dict[str, str] = {
    "cleanup": "effc.passes.cleanup:Cleanup",
    "merge_lora": "effc.passes.merge_lora:MergeLora",
    "int8": "effc.passes.int8:Int8",
    "nf4": "effc.passes.nf4:Nf4",
    "int4": "effc.passes.int4:Int4",
}


HOW_TO_GIVE = {Need.CALIBRATION: ": give --calib FILE (from `effc calibrate`) or --calib-data DATA",
               Need.CALIBRATION_DATA: ": give --calib-data DATA (a calibration file holds ranges, not samples)"}


def pass_class(name: str) -> type[Pass]:
    if name not in PASSES:
        raise EffcError(f"unknown pass {name!r}; passes: {', '.join(sorted(PASSES))} (see `effc passes`)")
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


def resolve(names: list[str], config_items: list[str] | tuple[str, ...] = (),
            have: set[Need] = frozenset({Need.EXAMPLE_INPUTS})) -> list[Pass]:
    """Validate the whole pipeline before any work: names, config keys and values, needs, ordering.

    Every problem found is reported together in one message.
    """
    problems: list[str] = []
    configs = {}
    try:
        configs = parse_pass_config(config_items)
    except EffcError as e:
        problems.append(str(e))
    for name in configs:
        if name not in names:
            problems.append(f"--pass-config sets {name}.*, but {name} is not in --passes")
    passes: list[Pass] = []
    for name in names:
        try:
            cls = pass_class(name)
            passes.append(cls(cls.config_class.from_strings(name, configs.get(name, {}))))
        except EffcError as e:
            problems.append(str(e))
    if len(set(names)) != len(names):
        problems.append(f"--passes lists a pass twice: {','.join(names)}")
    order = {p.name: i for i, p in enumerate(passes)}
    for p in passes:
        for other in p.after:
            if other in order and order[other] > order[p.name]:
                problems.append(f"pass {p.name} must run after {other}: write --passes ...,{other},{p.name},...")
        for other in p.before:
            if other in order and order[other] < order[p.name]:
                problems.append(f"pass {p.name} must run before {other}: write --passes ...,{p.name},{other},...")
        missing = p.needs() - set(have)
        for need in sorted(missing, key=lambda n: n.value):
            problems.append(f"pass {p.name} needs {need.value}, which was not given" + HOW_TO_GIVE.get(need, ""))
    if problems:
        raise EffcError("; ".join(problems))
    return passes

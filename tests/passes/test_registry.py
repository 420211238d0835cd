"""The pass registry: every entry imports and declares itself; the pipeline is validated before any work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from effc.errors import EffcError
from effc.passes import registry
from effc.passes.base import Capability, Level, Need, Pass, PassConfig


@pytest.mark.parametrize("name", sorted(registry.PASSES))
def test_every_pass_imports_and_declares(name):
    cls = registry.pass_class(name)
    assert cls.name == name
    assert isinstance(cls.level, Level)
    assert cls.summary
    p = cls()
    assert all(isinstance(n, Need) for n in p.needs())
    assert issubclass(cls.config_class, PassConfig)
    assert set(p.config.to_dict()) == set(cls.config_class.keys())


@dataclass(frozen=True)
class QuantConfig(PassConfig):
    mode: Literal["dynamic", "static"] = "dynamic"
    threshold: float | None = None
    exclude: tuple[str, ...] = ()
    bits: int = 8


class Quant(Pass[QuantConfig]):
    name = "quant"
    level = Level.FX
    config_class = QuantConfig
    summary = "test pass"
    expects = frozenset({Capability.MERGED_WEIGHTS})

    def needs(self):
        return {Need.CALIBRATION} if self.config.mode == "static" else set()


class Merge(Pass[PassConfig]):
    name = "merge"
    level = Level.FX
    summary = "test pass"
    provides = frozenset({Capability.MERGED_WEIGHTS})


@pytest.fixture
def fake_registry(monkeypatch):
    for name, cls in {"quant": Quant, "merge": Merge}.items():
        monkeypatch.setitem(registry.PASSES, name, f"{__name__}:{cls.__name__}")


def test_config_values_are_typed(fake_registry):
    (p,) = registry.resolve(["quant"], ["quant.threshold=6.0", "quant.exclude=lm_head,*.o_proj", "quant.bits=4"])
    assert p.config == QuantConfig("dynamic", 6.0, ("lm_head", "*.o_proj"), 4)
    (p,) = registry.resolve(["quant"], ["quant.threshold=none"])
    assert p.config.threshold is None


@pytest.mark.parametrize("items, message", [
    (["quant.mode=fast"], "not one of dynamic, static"),
    (["quant.bits=four"], "not an integer"),
    (["quant.threshold=high"], "not a number"),
    (["quant.colour=red"], "no config key 'colour'"),
])
def test_bad_config_is_rejected(fake_registry, items, message):
    with pytest.raises(EffcError, match=message):
        registry.resolve(["quant"], items)


def test_needs_and_ordering_are_checked_together(fake_registry):
    with pytest.raises(EffcError) as err:
        registry.resolve(["quant", "merge"], ["quant.mode=static"])
    text = str(err.value)
    assert "quant must run after merge, which provides merged_weights" in text
    assert "needs calibration" in text
    registry.resolve(["merge", "quant"], ["quant.mode=static"], have={Need.EXAMPLE_INPUTS, Need.CALIBRATION})


def test_names_are_checked_from_the_table_alone(fake_registry, monkeypatch):
    """Unknown or repeated names and stray --pass-config are answered without importing any pass module."""
    monkeypatch.setattr(registry, "pass_class", lambda name: pytest.fail(f"imported pass {name}"))
    problems = registry.name_problems(["quant", "nope", "quant"], ["merge.x=1", "quant.mode=static"])
    assert [p.split(";")[0].split(":")[0] for p in problems] == [
        "unknown pass 'nope'", "--passes lists a pass twice", "--pass-config sets merge.*, but merge is not in --passes"]
    with pytest.raises(EffcError, match="unknown pass 'nope'"):
        registry.resolve(["nope", "quant"], ["quant.colour=red"])


def test_needs_by_setting_finds_the_settings_that_bring_a_need():
    assert registry.needs_by_setting(Quant) == {Need.CALIBRATION: ["mode=static"]}
    assert registry.needs_by_setting(Merge) == {}
    int8 = registry.needs_by_setting(registry.pass_class("int8"))
    assert int8 == {Need.CALIBRATION: ["mode=static", "outlier_threshold", "smoothquant_alpha"]}
    assert registry.needs_by_setting(registry.pass_class("int4")) == {Need.CALIBRATION_DATA: ["method=gptq|awq"]}


def test_duplicate_pass_is_rejected(fake_registry):
    with pytest.raises(EffcError, match="twice"):
        registry.resolve(["merge", "merge"])


def test_quantization_expects_merged_weights_from_merge_lora():
    """The real passes order by capability: int8, nf4 and int4 after merge_lora, whichever comes first."""
    for quant in ("int8", "nf4", "int4"):
        assert Capability.MERGED_WEIGHTS in registry.pass_class(quant).expects
        with pytest.raises(EffcError, match=f"pass {quant} must run after merge_lora, which provides merged_weights"):
            registry.resolve([quant, "merge_lora"])
        registry.resolve(["merge_lora", quant])

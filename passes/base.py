"""The pass interface: a named transformation of one IR with a typed, frozen config."""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from effc.errors import EffcError


class Level(str, enum.Enum):
    FX = "fx"  # torch.export ExportedProgram; must still run in PyTorch afterwards
    ONNX = "onnx"  # onnx ModelProto, after lowering


class Need(str, enum.Enum):
    EXAMPLE_INPUTS = "example_inputs"
    CALIBRATION = "calibration"
    CALIBRATION_DATA = "calibration_data"  # samples, not just ranges (GPTQ's Hessians, AWQ's search)


class Capability(str, enum.Enum):
    """What a pass makes true of the graph, for the passes that expect it (Pass.provides, Pass.expects)."""

    MERGED_WEIGHTS = "merged_weights"  # adapters folded into the base weights
    QUANTIZED_WEIGHTS = "quantized_weights"  # int8/int4/nf4 weights chosen (half precision converts what is left)


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: frozen dataclass fields are the keys `--pass-config name.key=value` may set."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_strings(cls, pass_name: str, values: dict[str, str]) -> PassConfig:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, text in values.items():
            if key not in hints:
                raise EffcError(f"pass {pass_name} has no config key {key!r}; keys: {', '.join(cls.keys()) or '(none)'}")
            kwargs[key] = parse_value(f"{pass_name}.{key}", hints[key], text)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_value(where: str, hint: Any, text: str) -> Any:
    """Parse a command-line string into the annotated type (bool, int, float, str, Literal, Optional, tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        if text.lower() in ("none", "null", "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        kinds = []
        for member in inner:  # the first member that parses it (float | Literal["auto"])
            try:
                return parse_value(where, member, text)
            except EffcError as e:
                kinds.append(str(e).split(" is not ", 1)[-1])
        raise EffcError(f"{where}={text!r} is not {' or '.join(kinds)}")
    if origin is Literal:
        if text not in [str(a) for a in args]:
            raise EffcError(f"{where}={text!r} is not one of {', '.join(map(str, args))}")
        return next(a for a in args if str(a) == text)
    if origin is tuple:
        return tuple(parse_value(where, args[0], t.strip()) for t in text.split(",") if t.strip())
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise EffcError(f"{where}={text!r} is not a boolean (true or false)")
        return text.lower() in ("true", "1", "yes")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise EffcError(f"{where}={text!r} is not {'an integer' if hint is int else 'a number'}") from None
    return text


@dataclass
class PassResult:
    ir: Any
    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rules: dict[str, int] = field(default_factory=dict)  # "<pass>/<rule>" -> nodes it rewrote (passes/rewrite.py)


@dataclass
class PassContext:
    """What a pass may read besides its IR."""

    example_inputs: dict[str, Any] | None = None
    calibration: Any = None
    source: Any = None
    log: Any = print
    # Batches of real inputs (--calib-data, up to --calib-samples samples) for passes that measure
    # activations (GPTQ Hessians, AWQ) or accuracy (int8.auto_exclude) while they work.
    data: list[dict[str, Any]] | None = None
    # Weight sets the runtime swaps in per run (switchable adapters): set name -> parameter name -> array.
    # Their parameters become overridable ONNX initializers; the first set is the default.
    weight_sets: dict[str, dict[str, Any]] = field(default_factory=dict)


C = TypeVar("C", bound=PassConfig)


class Pass(Generic[C]):
    """A pass transforms one IR. Subclasses set the class attributes and implement run()."""

    name: ClassVar[str]
    level: ClassVar[Level]
    config_class: ClassVar[type[PassConfig]] = PassConfig
    summary: ClassVar[str] = ""
    # Ordering by what the graph is like: a pass that expects a capability runs after every pass in
    # the pipeline that provides it (quantization expects merged weights, which merge_lora provides).
    provides: ClassVar[frozenset[Capability]] = frozenset()
    expects: ClassVar[frozenset[Capability]] = frozenset()
    # False for passes that change the numbers on purpose (quantization): the artifact is then verified
    # against the graph after the passes, and the distance to eager PyTorch is reported as accuracy.
    exact: ClassVar[bool] = True

    def __init__(self, config: C | None = None):
        self.config: C = config if config is not None else self.config_class()

    def needs(self) -> set[Need]:
        """What this pass needs with its current config (a static pass may need calibration data)."""
        return set()

    def reads_data(self) -> bool:
        """Whether run() reads PassContext.data (calibration samples), needed or merely used when given."""
        return Need.CALIBRATION_DATA in self.needs()

    def requires(self) -> dict[str, list[str]]:
        """What the machine running the artifact must have, e.g. {"cpu": ["vnni"]}: recorded in the
        manifest, checked by effc.runtime (runtime/cpu.py) when the artifact is opened."""
        return {}

    def unverifiable(self, target_column: str) -> str | None:
        """Why this machine cannot verify an artifact of this pass for the target column (bf16 where ONNX
        Runtime has only its CPU provider), or None; the compile is then refused before any work."""
        return None

    def prepare(self, source: Any) -> None:
        """Called with the loaded source before capture, for passes that configure the model itself."""

    def run(self, ir: Any, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

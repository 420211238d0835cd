"""effc.ops.registry: every effc op registered once with its fake and its translations, the per-column
tables the targets read, and check_target refusing an op a target cannot run, in one line, before export."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import effc.ops
from effc.errors import EffcError
from effc.ops.registry import OPS, check_target, ops_of, translations

ONNX_COLUMNS = ("onnx", "ort")


# Made inside a target's build only (passes/kv_attention.py, rms_norm.py, rotary.py for ort), so they have that column
# alone.
TARGET_INTERNAL = {"effc::cached_attention": ("ort",), "effc::rms_norm": ("ort",),
                   "effc::rotary": ("ort",)}


def test_every_effc_op_is_registered_with_fake_and_onnx_translations():
    modules = {"int8_linear_dynamic", "int8_linear_static", "int8_linear_per_token", "int8_linear_weight_only",
               "int8_embedding", "nf4_linear", "nbits_linear", "nbits_embedding", "cached_attention", "rms_norm", "rotary",
               "window_attention"}
    assert set(OPS) == {f"effc::{m}" for m in modules}
    for name, op in OPS.items():
        assert op.overload is getattr(torch.ops.effc, name.split("::")[1]).default
        assert getattr(effc.ops, name.split("::")[1]).OP is op  # one module per op, named for it
        assert callable(op.fake)
        assert all(callable(op.translations[c]) for c in TARGET_INTERNAL.get(name, ONNX_COLUMNS)), name


def test_translations_per_column():
    for column in ONNX_COLUMNS:
        assert set(translations(column)) == {op.overload for name, op in OPS.items()
                                             if column in TARGET_INTERNAL.get(name, ONNX_COLUMNS)}
    assert translations("torch") == {torch.ops.effc.nf4_linear.default: "effc_native::nf4_linear",
                                     torch.ops.effc.window_attention.default: "effc_native::window_attention"}
    assert translations("no such column") == {}


def test_native_twin_takes_the_ops_fake():
    from effc.native import native_fakes

    assert native_fakes() == {"effc_native::nf4_linear": OPS["effc::nf4_linear"].fake,
                              "effc_native::window_attention": OPS["effc::window_attention"].fake}


def test_target_classes_name_their_column():
    from effc.targets.onnx import OnnxTarget
    from effc.targets.ort import OrtTarget
    from effc.targets.pt2 import TorchTarget

    assert (OnnxTarget.column, OrtTarget.column, TorchTarget.column) == ("onnx", "ort", "torch")
    ort = OrtTarget().translations()
    assert torch.ops.aten.scaled_dot_product_attention.default in ort  # the ort target's own rewrite
    assert {k: v for k, v in ort.items() if k.namespace == "effc"} == translations("ort")


class _WeightOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.ones(8, 4, dtype=torch.int8))
        self.register_buffer("s", torch.ones(4))

    def forward(self, x):
        return torch.ops.effc.int8_linear_weight_only(x, self.w, self.s)


@pytest.fixture(scope="module")
def program():
    return torch.export.export(_WeightOnly(), (torch.randn(2, 8),))


def test_ops_of(program):
    assert ops_of(program) == {"effc::int8_linear_weight_only"}
    assert ops_of(torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))) == set()


def test_check_target(program):
    for column in ONNX_COLUMNS:
        check_target(program, SimpleNamespace(name=column, column=column))
    with pytest.raises(EffcError) as e:
        check_target(program, SimpleNamespace(name="torch", column="torch"))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("effc::int8_linear_weight_only has no translation for target torch; "
                              "targets that have it: onnx, ort")
    assert "--target onnx or ort" in message


def test_check_target_refuses_an_unregistered_effc_op():
    @torch.library.custom_op("effc::test_unregistered", mutates_args=())
    def unregistered(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @unregistered.register_fake
    def _(x):
        return torch.empty_like(x)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.effc.test_unregistered(x)

    program = torch.export.export(M(), (torch.randn(3),))
    with pytest.raises(EffcError, match="effc::test_unregistered is not registered in effc.ops.registry"):
        check_target(program, SimpleNamespace(name="ort", column="ort"))


def test_torch_column_callable_is_applied_as_a_decomposition(program):
    """A torch translation that is a callable replaces the op by aten ops (run_decompositions)."""
    from effc.targets.pt2 import lower

    def decompose(x, weight_t, weight_scale, bias=None):
        return x @ (weight_t.to(x.dtype) * weight_scale.to(x.dtype))

    lowered, native = lower(program, {torch.ops.effc.int8_linear_weight_only.default: decompose})
    assert native == {} and ops_of(lowered) == set()
    x = torch.randn(2, 8)
    torch.testing.assert_close(lowered.module()(x), program.module()(x), rtol=0, atol=0)

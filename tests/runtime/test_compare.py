"""The comparison used by verification and golden checks, against formulas computed here in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from effc.runtime.compare import Tolerance, compare


def test_statistics_match_formulas():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10, 32)).astype(np.float32)
    got = ref + rng.normal(0, 1e-3, ref.shape).astype(np.float32)
    (out,) = compare({"logits": ref}, {"logits": got}, Tolerance(1e-2, 0)).outputs
    d = np.abs(got.astype(np.float64) - ref)
    assert np.isclose(out.max_abs, d.max()) and np.isclose(out.mean_abs, d.mean())
    assert np.isclose(out.p99_abs, np.quantile(d, 0.99))
    sqnr = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / (d ** 2).sum())
    assert np.isclose(out.sqnr_db, sqnr)
    cos = (ref.ravel() @ got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got)
    assert np.isclose(out.cosine, cos, atol=1e-9)
    assert out.top1_agreement == np.mean(ref.argmax(-1) == got.argmax(-1))
    assert out.passed


def test_tolerance_is_allclose():
    ref = np.array([1.0, 100.0], dtype=np.float32)
    got = ref + np.array([0.02, 0.2], dtype=np.float32)
    assert compare({"y": ref}, {"y": got}, Tolerance(0.01, 0.01)).passed == np.allclose(got, ref, atol=0.01, rtol=0.01)
    assert not compare({"y": ref}, {"y": got}, Tolerance(0.01, 0.0)).passed


def test_padding_positions_are_left_out_but_counted():
    ref = np.zeros((2, 3, 4), np.float32)
    got = ref.copy()
    got[1, 2] = 5.0
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    result = compare({"h": ref}, {"h": got}, Tolerance(1e-4, 0), attention_mask=mask)
    assert result.passed and result.ignored_positions == 1
    assert not compare({"h": ref}, {"h": got}, Tolerance(1e-4, 0)).passed


def test_nan_shape_and_missing_outputs_fail():
    ref = np.ones(3, np.float32)
    assert not compare({"y": ref}, {"y": np.array([1, np.nan, 1], np.float32)}).passed
    assert not compare({"y": ref}, {"y": np.ones(4, np.float32)}).passed
    assert not compare({"y": ref}, {}).passed
    assert compare({"y": np.array([np.nan])}, {"y": np.array([np.nan])}, Tolerance(0, 0)).passed


def test_precision_aware_defaults():
    (f32,) = compare({"y": np.ones(2, np.float32)}, {"y": np.ones(2, np.float32)}).outputs
    (f16,) = compare({"y": np.ones(2, np.float16)}, {"y": np.ones(2, np.float16)}).outputs
    (i64,) = compare({"y": np.ones(2, np.int64)}, {"y": np.ones(2, np.int64)}).outputs
    assert (f32.atol, f32.rtol) == (1e-4, 1e-3) and f16.atol == 1e-2 and (i64.atol, i64.rtol) == (0, 0)


def test_pooled_over_batches_is_the_sum_of_their_terms():
    """Pooling two batches is comparing their concatenation; padding positions are left out."""
    from effc.runtime.compare import Pooled, pooled_sqnr_db

    rng = np.random.default_rng(1)
    ref = [rng.standard_normal((2, 5, 8)) for _ in range(2)]
    got = [r + 0.01 * rng.standard_normal(r.shape) for r in ref]
    mask = np.ones((2, 5), np.int64)
    mask[1, 3:] = 0
    got[0][1, 3:] = 1e6  # padding: must not count
    pooled = Pooled()
    for r, g, m in zip(ref, got, [mask, None]):
        pooled.add(r, g, m)
    whole_r = np.concatenate([ref[0][mask != 0], ref[1].reshape(-1, 8)])
    whole_g = np.concatenate([got[0][mask != 0], got[1].reshape(-1, 8)])
    single = compare({"x": whole_r}, {"x": whole_g}).outputs[0]
    assert pooled.sqnr_db == pytest.approx(single.sqnr_db, rel=1e-12)
    assert pooled.cosine == pytest.approx(single.cosine, rel=1e-12)
    assert pooled.max_abs == pytest.approx(single.max_abs)
    assert pooled_sqnr_db(ref, got, [mask, None]) == pytest.approx(single.sqnr_db, rel=1e-12)


def test_position_cosine_and_masks_take_torch_tensors():
    """The int8 scorer's statistic: torch's per-position cosine, padding left out, within float64 rounding."""
    torch = pytest.importorskip("torch")
    from effc.runtime.compare import position_cosine, top1_agreement, unpadded

    rng = np.random.default_rng(2)
    ref = torch.from_numpy(rng.standard_normal((2, 6, 16)).astype(np.float32))
    got = ref + 0.1 * torch.from_numpy(rng.standard_normal((2, 6, 16)).astype(np.float32))
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[0, 4:] = 0
    cos = torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1, eps=1e-12)
    assert position_cosine(ref, got, mask) == pytest.approx(float(cos[mask != 0].mean()), rel=1e-14)
    assert unpadded(ref, mask).shape == (10, 16) and unpadded(ref, None) is ref
    assert top1_agreement(ref.numpy(), ref.numpy(), mask.numpy()) == 1.0

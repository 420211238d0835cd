"""The comparison used by verification and golden checks, against formulas computed here in numpy."""

from __future__ import annotations

import numpy as np

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

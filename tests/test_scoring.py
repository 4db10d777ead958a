"""Tests for memscan.scoring: fused features give the weighted mean of Pearson correlations; flip invariance."""

from __future__ import annotations

import numpy as np
import pytest

from memscan.errors import InputError
from memscan.metrics import pearson
from memscan.scoring import flip_invariant_features, fuse_features, pixel_features, standardize_rows


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.corrcoef(a, b)[: len(a), len(a):]


@pytest.mark.parametrize("weights", [None, {"p": 1.0, "e": 3.0}, {"p": 0.0, "e": 1.0}])
def test_fused_pearson_is_weighted_mean(weights):
    rng = np.random.default_rng(0)
    p1, p2 = rng.normal(size=(5, 40)), rng.normal(size=(4, 40))
    e1, e2 = rng.normal(size=(5, 7)) * 10 + 3, rng.normal(size=(4, 7))
    w = weights or {"p": 1.0, "e": 1.0}
    expected = (w["p"] * _corr(p1, p2) + w["e"] * _corr(e1, e2)) / (w["p"] + w["e"])
    f1 = fuse_features({"p": p1, "e": e1}, weights)
    f2 = fuse_features({"p": p2, "e": e2}, weights)
    got = pearson(f1, f2, device="cpu").numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_fuse_rejects_bad_input():
    x = np.ones((3, 4)) + np.arange(4)
    with pytest.raises(InputError, match="different numbers of rows"):
        fuse_features({"a": x, "b": x[:2]})
    with pytest.raises(InputError, match="non-negative"):
        fuse_features({"a": x}, {"a": -1.0})
    with pytest.raises(InputError, match="no feature block"):
        fuse_features({"a": x}, {"b": 1.0})
    with pytest.raises(InputError, match="constant"):
        standardize_rows(np.ones((2, 5)))


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 1, 4, 6, 6)])
def test_flip_invariant_features(shape):
    rng = np.random.default_rng(1)
    x = rng.random(shape).astype(np.float32)
    f = flip_invariant_features(x, pixel_features)
    f_flip = flip_invariant_features(np.flip(x, axis=-1).copy(), pixel_features)
    np.testing.assert_allclose(f, f_flip, atol=1e-6)
    # a different image does not become identical
    assert not np.allclose(f[0], f[1])
    with pytest.raises(InputError):
        flip_invariant_features(x, pixel_features, axes=(1,))


def test_pixel_features_downsample():
    x = np.arange(2 * 16 * 16, dtype=np.float32).reshape(2, 1, 16, 16)
    assert pixel_features(x).shape == (2, 256)
    small = pixel_features(x, [4, 4])
    assert small.shape == (2, 16)
    np.testing.assert_allclose(small[0, 0], x[0, 0, :4, :4].mean())

"""Tests for memscan.metrics against scipy and a brute-force numpy statement of the paper's formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from memscan import metrics
from memscan.errors import InputError
from memscan.metrics import (
    best_of_correlation,
    blend_correlation,
    calibrate_threshold,
    load_embeddings,
    match,
    pearson,
    percentile,
    resolve_device,
    topk_correlation,
    validate_embeddings,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------ helpers
def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - cdist(a, b, "correlation")


def dense_blend(q: np.ndarray, r: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """The greedy two-source fit written out on dense matrices: best reference, best reference for the residual,
    multiple correlation of the non-negative least-squares blend (else the best single correlation)."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = x - x.mean(1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    qs, rs = unit(q), unit(r)
    c = qs @ rs.T
    if allowed is not None:
        c = np.where(allowed, c, -np.inf)
    out = c.max(axis=1)
    for n in range(len(q)):
        i = int(np.argmax(c[n]))
        resid = qs[n] - c[n, i] * rs[i]
        e = np.where(allowed[n] if allowed is not None else True, rs @ resid, -np.inf)
        j = int(np.argmax(e))
        w, *_ = np.linalg.lstsq(np.stack([rs[i], rs[j]], 1), qs[n], rcond=None)
        if j != i and (w > 0).all():
            out[n] = max(out[n], float(np.sqrt(qs[n] @ (np.stack([rs[i], rs[j]], 1) @ w))))
    return out


def with_duplicates(rng: np.random.Generator, n: int, d: int, n_dup: int) -> np.ndarray:
    """Random rows where ``n_dup`` rows are exact copies of earlier or later rows (exact ties)."""
    x = rng.normal(size=(n, d))
    for _ in range(n_dup):
        i, j = rng.integers(0, n, size=2)
        x[j] = x[i]
    return x


def brute_topk(c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k: sort by value descending, ties by lowest column (stable argsort of -c)."""
    order = np.argsort(-c, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(c, order, 1), order


def paper(train: np.ndarray, val: np.ndarray, syn: np.ndarray, p: float) -> dict:
    """The paper's formulas, stated with dense scipy matrices."""
    best_val = corr(train, val).max(axis=1)
    tau = np.percentile(best_val, p)
    ts = corr(train, syn)
    return {"tau": tau, "best_syn": ts.max(axis=1), "best_syn_idx": ts.argmax(axis=1),
            "best_train": ts.max(axis=0), "best_train_idx": ts.argmax(axis=0),
            "best_val_syn": corr(syn, val).max(axis=1)}


def assert_count_matches(count: int, values: np.ndarray, tau: float, tol: float = 1e-9) -> None:
    """``count`` equals #(values > tau), allowing only values within ``tol`` of tau to go either way."""
    assert int((values > tau + tol).sum()) <= count <= int((values > tau - tol).sum())


def assert_indices_match(got: np.ndarray, c: np.ndarray, ref_idx: np.ndarray, axis: int,
                         candidates: np.ndarray) -> None:
    """Indices equal the reference (first maximum), except where the maximum is within 1e-9 of a value that
    belongs to a *different* candidate vector (a near-tie that rounding may decide either way)."""
    c = c if axis == 1 else c.T
    got, ref_idx = np.asarray(got), np.asarray(ref_idx)
    for row in range(c.shape[0]):
        near = np.flatnonzero(c[row] > c[row].max() - 1e-9)
        if all(np.array_equal(candidates[j], candidates[near[0]]) for j in near):  # exact duplicates or unique
            assert got[row] == ref_idx[row] == near[0], row


def unambiguous_rows(c: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Rows of ``c`` with no two finite values within 1e-9 of each other from different candidate vectors
    (exact duplicates tie exactly and must resolve to the lowest index; near-ties may round either way)."""
    keep = np.ones(c.shape[0], dtype=bool)
    for row in range(c.shape[0]):
        finite = np.flatnonzero(np.isfinite(c[row]))
        order = finite[np.argsort(c[row, finite], kind="stable")]
        for a, b in zip(order[:-1], order[1:]):
            if c[row, b] - c[row, a] < 1e-9 and not np.array_equal(candidates[a], candidates[b]):
                keep[row] = False
                break
    return keep


sizes = st.integers(min_value=1, max_value=40)
dims = st.integers(min_value=2, max_value=12)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


# ------------------------------------------------------------------------------------------------ pearson
@SETTINGS
@given(n=sizes, m=sizes, d=dims, seed=seeds, scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_pearson_equals_scipy(n: int, m: int, d: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, d)) * scale + 3.0, rng.normal(size=(m, d)) * scale - 1.0
    ref = corr(a, b)
    np.testing.assert_allclose(pearson(a, b, device="cpu", dtype="float64").numpy(), ref, atol=1e-12, rtol=0)
    a32 = a.astype(np.float32)  # float32 products of the same (float32) input agree with scipy to 1e-5
    np.testing.assert_allclose(pearson(a32, b, device="cpu").numpy(), corr(a32.astype(np.float64), b), atol=1e-5,
                               rtol=0)


# ------------------------------------------------------------------------------------------------ top-k
@SETTINGS
@given(n=sizes, m=sizes, d=dims, k=st.integers(1, 6), seed=seeds, n_dup=st.integers(0, 10),
       block=st.one_of(st.none(), st.integers(1, 7), st.tuples(st.integers(1, 7), st.integers(1, 7))))
def test_topk_matches_bruteforce_with_ties_and_blocks(n: int, m: int, d: int, k: int, seed: int, n_dup: int,
                                                      block) -> None:
    rng = np.random.default_rng(seed)
    q, r = rng.normal(size=(n, d)), with_duplicates(rng, m, d, n_dup)
    c = corr(q, r)
    values, indices = topk_correlation(q, r, k, device="cpu", dtype="float64", block_size=block)
    ref_v, ref_i = brute_topk(c, k)
    assert values.shape == indices.shape == (n, min(k, m))
    assert values.dtype == np.float64 and indices.dtype == np.int64
    np.testing.assert_allclose(values, ref_v, atol=1e-12, rtol=0)
    keep = unambiguous_rows(c, r)
    np.testing.assert_array_equal(indices[keep], ref_i[keep])


def test_ties_go_to_lowest_index_across_block_boundaries() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 8))
    reference = np.stack([base[1], base[0], base[2], base[0], base[0], base[1], base[2]])
    query = base + 1e-3 * rng.normal(size=base.shape)
    for block in [1, 2, 3, (1, 2), None]:
        for dtype in ["float32", "float64"]:
            v, i = topk_correlation(query, reference, k=3, device="cpu", block_size=block, dtype=dtype)
            assert i[0].tolist() == [1, 3, 4], (block, dtype)
            assert i[1].tolist() == [0, 5, i[1, 2]] and i[1, 2] in (1, 2)
            assert i[2].tolist() == [2, 6, i[2, 2]]
            assert v[0, 0] == v[0, 1] == v[0, 2]


@pytest.mark.parametrize("block", [(128, 256), (256, 128), (128, 128), None, (64, 64), (50, 70)])
def test_chunked_cpu_search_exact_across_tiles(block) -> None:
    """Multi-tile CPU search (chunked maxima, padding rows) with exact ties spread over tiles, both directions."""
    rng = np.random.default_rng(21)
    train = with_duplicates(rng, 300, 16, 60)
    syn = with_duplicates(rng, 450, 16, 80)
    syn[-5:] = train[-5:]  # the same vectors in both sets: ties in rows and columns
    res = match(train, rng.normal(size=(70, 16)), syn, device="cpu", n_bootstrap=0, dtype="float64",
                block_size=block)
    ts = corr(train, syn)
    ref_rows = np.array([np.flatnonzero(row == row.max())[0] for row in ts])
    ref_cols = np.array([np.flatnonzero(col == col.max())[0] for col in ts.T])
    keep_r, keep_c = unambiguous_rows(ts, syn), unambiguous_rows(ts.T, train)
    np.testing.assert_array_equal(res.train_table["best_synthetic_index"].to_numpy()[keep_r], ref_rows[keep_r])
    np.testing.assert_array_equal(res.synthetic_table["best_train_index"].to_numpy()[keep_c], ref_cols[keep_c])
    np.testing.assert_allclose(res.best_train_for_synthetic, ts.max(axis=0), atol=1e-12)
    v, i = topk_correlation(syn, train, 3, device="cpu", dtype="float64", block_size=block)
    ref_v, ref_i = brute_topk(ts.T, 3)
    np.testing.assert_allclose(v, ref_v, atol=1e-12)
    np.testing.assert_array_equal(i[keep_c], ref_i[keep_c])


def test_search_accepts_any_array_layout(tmp_path) -> None:
    """Reversed, strided, read-only and memory-mapped embeddings give the same answer as a plain copy."""
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(90, 12)).astype(np.float32), rng.normal(size=(70, 24)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    frozen = b[:, ::2].copy()
    frozen.flags.writeable = False
    for q, r in [(mapped, b[:, ::2]), (a[::-1], frozen), (np.asfortranarray(a), b[::-1, ::2])]:
        got = metrics.best_matches(q, r, device="cpu")
        expected = metrics.best_matches(np.array(q), np.array(r), device="cpu")
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_search_workers_keep_lowest_index_ties(threads: int, block: int) -> None:
    """Worker threads take row blocks in any order: exact ties across blocks, and inside one chunk of the chunked
    search (rows 10 and 20, synthetic 7 and 123), still go to the lowest index."""
    rng = np.random.default_rng(5)
    v = rng.normal(size=16)
    train = rng.normal(size=(400, 16))
    train[[10, 20, 150, 290, 399]] = [v, 0.25 * v, 2 * v, 4 * v, 8 * v]  # distinct rows, identical once standardised
    syn = rng.normal(size=(300, 16))
    syn[[7, 123, 250]] = [v, 0.5 * v, 16 * v]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        qv, qi, rv, ri = metrics.best_matches(train, syn, device="cpu", dtype="float32", block_size=block)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    assert qi[[10, 20, 150, 290, 399]].tolist() == [7, 7, 7, 7, 7]
    assert ri[[7, 123, 250]].tolist() == [10, 10, 10]
    c = corr(train, syn)
    np.testing.assert_allclose(qv, c.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(rv, c.max(axis=0), atol=1e-5)


@SETTINGS
@given(n=sizes, m=sizes, d=dims, seed=seeds, n_dup=st.integers(0, 8),
       block=st.one_of(st.none(), st.integers(1, 7), st.just((64, 64))))
def test_best_matches_both_directions(n: int, m: int, d: int, seed: int, n_dup: int, block) -> None:
    rng = np.random.default_rng(seed)
    q, r = with_duplicates(rng, n, d, n_dup), with_duplicates(rng, m, d, n_dup)
    c = corr(q, r)
    qv, qi, rv, ri = metrics.best_matches(q, r, device="cpu", dtype="float64", block_size=block)
    np.testing.assert_allclose(qv, c.max(axis=1), atol=1e-12)
    np.testing.assert_allclose(rv, c.max(axis=0), atol=1e-12)
    keep_q, keep_r = unambiguous_rows(c, r), unambiguous_rows(c.T, q)
    np.testing.assert_array_equal(qi[keep_q], c.argmax(axis=1)[keep_q])
    np.testing.assert_array_equal(ri[keep_r], c.argmax(axis=0)[keep_r])


def test_duplicate_grouping_hash_matches_exact_bytes() -> None:
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        x = with_duplicates(rng, 500, 8, 120).astype(dtype)
        x[7] = x[3]
        x[3, 0], x[7, 0] = 0.0, -0.0  # -0.0 and 0.0 are the same value
        codes = rng.integers(0, 3, size=500)
        for c in (None, codes):
            first, inverse = metrics._unique_rows(x, c)
            ref_first, ref_inverse = metrics._unique_rows_exact(x, c)
            np.testing.assert_array_equal(first, ref_first)
            np.testing.assert_array_equal(inverse, ref_inverse)
            assert (np.diff(first) > 0).all() and (x[first[inverse]] == x).all()
        assert metrics._unique_rows(x, None)[1][7] == metrics._unique_rows(x, None)[1][3]


def test_k_larger_than_reference_is_capped() -> None:
    rng = np.random.default_rng(1)
    v, i = topk_correlation(rng.normal(size=(4, 5)), rng.normal(size=(3, 5)), k=10, device="cpu")
    assert v.shape == (4, 3)
    assert sorted(i[0].tolist()) == [0, 1, 2]


@SETTINGS
@given(n=sizes, m=sizes, d=dims, k=st.integers(1, 4), seed=seeds, n_subjects=st.integers(1, 6),
       block=st.one_of(st.none(), st.integers(1, 5)), as_str=st.booleans())
def test_subject_exclusion(n: int, m: int, d: int, k: int, seed: int, n_subjects: int, block, as_str: bool) -> None:
    rng = np.random.default_rng(seed)
    q, r = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    qg, rg = rng.integers(0, n_subjects, size=n), rng.integers(0, n_subjects, size=m)
    if as_str:
        qg, rg = np.array([f"patient-{g}" for g in qg]), [f"patient-{g}" for g in rg]
    c = corr(q, r)
    c[np.asarray(qg)[:, None] == np.asarray(rg)[None, :]] = -np.inf
    v, i = topk_correlation(q, r, k, query_groups=qg, reference_groups=rg, device="cpu", dtype="float64",
                            block_size=block)
    ref_v, ref_i = brute_topk(c, k)
    np.testing.assert_allclose(v, ref_v, atol=1e-12, rtol=0)
    finite, keep = np.isfinite(ref_v), unambiguous_rows(c, r)
    np.testing.assert_array_equal(i[keep & finite.all(1)], ref_i[keep & finite.all(1)])
    assert (i[~finite] == -1).all() and (i[finite] >= 0).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_two_way_search_with_exclusion_locates_both_directions(threads: int) -> None:
    """The chunked CPU search with subject exclusion, both directions and located indices (the rows' and the
    columns' maxima are located side by side): every index is the first unexcluded maximum."""
    rng = np.random.default_rng(17)
    n, m, d = 700, 530, 8
    q, r = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    qg, rg = rng.integers(0, 3, size=n), rng.integers(0, 3, size=m)
    qs = metrics._standardize(q, torch.device("cpu"), torch.float64, metrics._CHUNK)
    rs = metrics._standardize(r, torch.device("cpu"), torch.float64, metrics._CHUNK)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rv, ri, cv, ci = metrics._search(qs, rs, 1, n=n, m=m, q_codes=qg, r_codes=rg, block=(256, 256),
                                         columns=True, chunk=metrics._CHUNK, workers=threads)
    finally:
        torch.set_num_threads(before)
    c = corr(q, r)
    c[qg[:, None] == rg[None, :]] = -np.inf
    np.testing.assert_allclose(rv[:, 0].numpy(), c.max(axis=1), atol=1e-12)
    np.testing.assert_allclose(cv.numpy(), c.max(axis=0), atol=1e-12)
    np.testing.assert_array_equal(ri[:, 0].numpy(), c.argmax(axis=1))
    np.testing.assert_array_equal(ci.numpy(), c.argmax(axis=0))


def test_groups_must_match_lengths() -> None:
    x = np.random.default_rng(0).normal(size=(4, 3))
    with pytest.raises(InputError, match="query_groups"):
        topk_correlation(x, x, query_groups=[1, 2], reference_groups=[1, 2, 3, 4], device="cpu")


def test_tiny_memory_budget_still_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_free_memory_bytes", lambda device: 1 << 10)
    bq, br = metrics._block_shape(5000, 7000, torch.device("cpu"), torch.float32, None)
    assert bq * br <= 1 << 14 and bq % metrics._CHUNK == 0 and br % metrics._CHUNK == 0
    rng = np.random.default_rng(3)
    q, r = rng.normal(size=(60, 6)), rng.normal(size=(300, 6))
    v, i = topk_correlation(q, r, 2, device="cpu", dtype="float64")
    ref_v, ref_i = brute_topk(corr(q, r), 2)
    np.testing.assert_allclose(v, ref_v, atol=1e-12)
    np.testing.assert_array_equal(i, ref_i)


def test_auto_block_never_covers_large_matrix() -> None:
    bq, br = metrics._block_shape(200_000, 200_000, torch.device("cpu"), torch.float32, None)
    assert bq * br <= metrics._CPU_TILE_CAP
    assert metrics._free_memory_bytes(torch.device("cpu")) > 0


# ------------------------------------------------------------------------------------------------ percentile / τ
@SETTINGS
@given(values=st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=60), p=st.floats(0, 100))
def test_percentile_equals_numpy(values: list[float], p: float) -> None:
    assert percentile(values, p) == pytest.approx(np.percentile(values, p), abs=1e-12)


def test_percentile_beyond_torch_quantile_limit() -> None:
    x = torch.rand(2**24 + 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    with pytest.raises(RuntimeError):
        torch.quantile(torch.as_tensor(x), 0.95)  # the limit our implementation avoids
    assert percentile(x, 95.0) == pytest.approx(np.percentile(x, 95.0), abs=1e-12)


@SETTINGS
@given(n=sizes, m=sizes, d=dims, seed=seeds, p=st.floats(0, 100), block=st.one_of(st.none(), st.integers(1, 5)))
def test_calibrate_threshold_equals_paper(n: int, m: int, d: int, seed: int, p: float, block) -> None:
    rng = np.random.default_rng(seed)
    t, v = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    expected = np.percentile(corr(t, v).max(axis=1), p)
    assert calibrate_threshold(t, v, p, device="cpu", dtype="float64", block_size=block) == pytest.approx(
        expected, abs=1e-6)
    assert calibrate_threshold(t, v, p, device="cpu") == pytest.approx(expected, abs=1e-5)


def test_calibrate_threshold_subjects_excluded() -> None:
    rng = np.random.default_rng(4)
    t = rng.normal(size=(30, 5))
    v = np.concatenate([t[:10] + 1e-6 * rng.normal(size=(10, 5)), rng.normal(size=(20, 5))])
    ts, vs = [f"s{i}" for i in range(30)], [f"s{i}" for i in range(10)] + [f"o{i}" for i in range(20)]
    c = corr(t, v)
    c[np.asarray(ts)[:, None] == np.asarray(vs)[None, :]] = -np.inf
    got = calibrate_threshold(t, v, 95, train_subjects=ts, val_subjects=vs, device="cpu", dtype="float64")
    assert got == pytest.approx(np.percentile(c.max(axis=1), 95), abs=1e-9)
    assert got < 0.999  # the same-patient near-copies no longer set τ
    with pytest.raises(InputError, match=r"row 0"):
        calibrate_threshold(t[:1], v[:1], train_subjects=["a"], val_subjects=["a"], device="cpu")


# ------------------------------------------------------------------------------------------------ match
@SETTINGS
@given(n=st.integers(2, 30), m=st.integers(2, 30), s=st.integers(1, 30), d=dims, seed=seeds,
       p=st.floats(0, 100), n_dup=st.integers(0, 6), block=st.one_of(st.none(), st.integers(1, 6)))
def test_match_equals_paper(n: int, m: int, s: int, d: int, seed: int, p: float, n_dup: int, block) -> None:
    rng = np.random.default_rng(seed)
    train, val = with_duplicates(rng, n, d, n_dup), rng.normal(size=(m, d))
    syn = np.concatenate([train[rng.integers(0, n, size=s // 2)] + 1e-3 * rng.normal(size=(s // 2, d)),
                          rng.normal(size=(s - s // 2, d))])
    ref = paper(train, val, syn, p)
    res = match(train, val, syn, p, device="cpu", n_bootstrap=20, seed=seed, dtype="float64", block_size=block)
    out = res.summary
    assert out["threshold"] == pytest.approx(ref["tau"], abs=1e-6)
    assert_count_matches(out["n_memorized_train"], ref["best_syn"], ref["tau"])
    assert_count_matches(out["n_copies_synthetic"], ref["best_train"], ref["tau"])
    assert out["frac_memorized_train"] == out["n_memorized_train"] / n
    assert out["frac_copies_synthetic"] == out["n_copies_synthetic"] / s  # not / n_train as in the notebook
    ts = corr(train, syn)
    assert_indices_match(res.train_table["best_synthetic_index"], ts, ref["best_syn_idx"], 1, syn)
    assert_indices_match(res.synthetic_table["best_train_index"], ts, ref["best_train_idx"], 0, train)
    np.testing.assert_allclose(res.train_table["correlation"], ref["best_syn"], atol=1e-12)
    np.testing.assert_allclose(res.synthetic_table["correlation"], ref["best_train"], atol=1e-12)
    np.testing.assert_allclose(res.synthetic_table["best_validation_correlation"], ref["best_val_syn"], atol=1e-12)
    np.testing.assert_allclose(res.synthetic_table["margin"], ref["best_train"] - out["threshold"], atol=1e-12)
    np.testing.assert_array_equal(res.train_table["memorized"], res.best_synthetic_for_train > res.threshold)
    np.testing.assert_array_equal(res.synthetic_table["copy"], res.best_train_for_synthetic > res.threshold)
    np.testing.assert_allclose(res.best_val_for_train, corr(train, val).max(axis=1), atol=1e-12)


def test_match_float32_agrees_with_float64() -> None:
    rng = np.random.default_rng(7)
    train, val, syn = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)), rng.normal(size=(120, 16))
    a = match(train, val, syn, device="cpu", n_bootstrap=0)
    b = match(train, val, syn, device="cpu", n_bootstrap=0, dtype="float64")
    assert a.threshold == pytest.approx(b.threshold, abs=1e-5)
    np.testing.assert_allclose(a.best_train_for_synthetic, b.best_train_for_synthetic, atol=1e-5)
    assert a.summary["dtype"] == "float32" and b.summary["dtype"] == "float64"


def test_match_finds_planted_copies_and_tables() -> None:
    rng = np.random.default_rng(11)
    train, val = rng.normal(size=(120, 32)), rng.normal(size=(100, 32))
    copied = np.arange(0, 120, 12)  # 10 training samples copied; 50 novel synthetic samples, none above τ
    syn = np.concatenate([rng.normal(size=(50, 32)), train[copied] + 1e-4 * rng.normal(size=(10, 32))])
    ids = [f"train/{i:03d}.png" for i in range(120)]
    sids = [f"syn/{i:03d}.png" for i in range(60)]
    res = match(train, val, syn, 99.0, device="cpu", n_bootstrap=300, seed=1, train_ids=ids, synthetic_ids=sids)
    s = res.summary
    for key in ["threshold", "percentile", "n_train", "n_val", "n_synthetic", "n_memorized_train",
                "frac_memorized_train", "n_copies_synthetic", "frac_copies_synthetic", "threshold_ci95",
                "frac_memorized_train_ci95", "frac_copies_synthetic_ci95", "null_rate", "memscan_version"]:
        assert key in s
    assert (s["n_train"], s["n_val"], s["n_synthetic"]) == (120, 100, 60)
    assert s["n_copies_synthetic"] == 10 and s["n_memorized_train"] == 10
    assert s["frac_copies_synthetic"] == pytest.approx(10 / 60)
    flagged = res.train_table.loc[res.train_table["memorized"], "train_index"].to_numpy()
    np.testing.assert_array_equal(flagged, copied)
    np.testing.assert_array_equal(res.synthetic_table["best_train_index"].to_numpy()[50:], copied)
    assert list(res.train_table.columns) == ["train_index", "train_id", "best_synthetic_index", "best_synthetic_id",
                                             "correlation", "memorized"]
    assert list(res.synthetic_table.columns) == ["synthetic_index", "synthetic_id", "best_train_index",
                                                 "best_train_id", "correlation", "best_validation_correlation",
                                                 "margin", "copy"]
    assert res.synthetic_table["best_train_id"].iloc[55] == ids[copied[5]]
    lo, hi = s["threshold_ci95"]
    assert lo <= s["threshold"] <= hi
    lo, hi = s["frac_copies_synthetic_ci95"]
    assert lo <= s["frac_copies_synthetic"] <= hi and hi < 1
    assert res.bootstrap["threshold"].shape == (300,)


def test_bootstrap_is_the_resampling_it_claims() -> None:
    rng = np.random.default_rng(2)
    bv, bs, bt = rng.random(50), rng.random(50), rng.random(40)
    draws = metrics._bootstrap(bv, bs, bt, 90.0, 25,
                               np.random.default_rng(9))
    again = np.random.default_rng(9)
    idx = np.argsort(bv, kind="stable")[again.integers(0, 50, size=(25, 50))]  # draws are ranks by best_val
    tau = np.percentile(bv[idx], 90.0, axis=1)
    np.testing.assert_allclose(draws["threshold"], tau, atol=1e-12)
    np.testing.assert_allclose(draws["frac_memorized_train"], (bs[idx] > tau[:, None]).mean(axis=1))
    share = (bt[None, :] > tau[:, None]).mean(axis=1)
    np.testing.assert_allclose(draws["frac_copies_synthetic"], again.binomial(40, share) / 40)


def test_headroom_raises_tau_toward_an_exact_copy() -> None:
    rng = np.random.default_rng(11)
    train, val = rng.normal(size=(60, 8)), rng.normal(size=(50, 8))
    # synthetic: 5 near-copies, 5 half-way blends (correlation ~0.7 with their source), 20 strangers
    syn = np.concatenate([train[:5] + 0.01 * rng.normal(size=(5, 8)), train[5:10] + rng.normal(size=(5, 8)),
                          rng.normal(size=(20, 8))])
    plain = match(train, val, syn, device="cpu", n_bootstrap=200, seed=1)
    strict = match(train, val, syn, device="cpu", n_bootstrap=200, seed=1, headroom=0.5)
    tau_p = paper(train, val, syn, 95.0)["tau"]
    assert plain.summary["percentile_threshold"] == plain.threshold == pytest.approx(tau_p, abs=1e-6)  # float32
    assert plain.summary["headroom"] == 0.0
    assert strict.summary["percentile_threshold"] == plain.threshold
    assert strict.threshold == pytest.approx(plain.threshold + 0.5 * (1 - plain.threshold), abs=1e-12)
    assert metrics.with_headroom(plain.threshold, 0.5) == pytest.approx(strict.threshold, abs=1e-12)
    best = strict.best_train_for_synthetic
    assert_count_matches(strict.summary["n_copies_synthetic"], best, strict.threshold)
    assert strict.synthetic_table["copy"].to_numpy().tolist() == (best > strict.threshold).tolist()
    assert strict.summary["n_copies_synthetic"] < plain.summary["n_copies_synthetic"]  # the blends drop out
    assert strict.synthetic_table["copy"].to_numpy()[:5].all()  # the near-copies stay
    # the bootstrap and the null split judge the same rule: τ* raised per draw, τ_A raised
    np.testing.assert_allclose(strict.bootstrap["threshold"], metrics.with_headroom(plain.bootstrap["threshold"], 0.5))
    assert strict.summary["null_threshold"] == pytest.approx(metrics.with_headroom(plain.summary["null_threshold"],
                                                                                   0.5), abs=1e-12)
    assert strict.summary["null_rate"] <= plain.summary["null_rate"]
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(InputError, match="headroom"):
            match(train, val, syn, device="cpu", headroom=bad)


def test_match_is_reproducible_and_bootstrap_optional() -> None:
    rng = np.random.default_rng(5)
    train, val, syn = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)), rng.normal(size=(20, 8))
    a = match(train, val, syn, device="cpu", n_bootstrap=50, seed=3).summary
    b = match(train, val, syn, device="cpu", n_bootstrap=50, seed=3).summary
    assert a == b
    c = match(train, val, syn, device="cpu", n_bootstrap=0).summary
    assert c["threshold_ci95"] is None and c["n_bootstrap"] == 0


def test_null_rate_is_near_nominal_on_exchangeable_data() -> None:
    rates = []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        train, val, syn = rng.normal(size=(400, 16)), rng.normal(size=(400, 16)), rng.normal(size=(20, 16))
        s = match(train, val, syn, 95, device="cpu", n_bootstrap=0, seed=seed).summary
        assert s["null_split_sizes"] == [200, 200]
        assert s["null_rate_expected"] == pytest.approx(0.05)
        rates.append(s["null_rate"])
    assert 0.025 < np.mean(rates) < 0.09


def test_null_split_by_subject_and_exclusion_flag() -> None:
    rng = np.random.default_rng(6)
    train, val, syn = rng.normal(size=(30, 8)), rng.normal(size=(24, 8)), rng.normal(size=(10, 8))
    vs = np.repeat(np.arange(8), 3)
    s = match(train, val, syn, device="cpu", n_bootstrap=0, val_subjects=vs).summary
    assert s["null_split_sizes"] == [12, 12] and not s["subject_exclusion"]
    s = match(train, val, syn, device="cpu", n_bootstrap=0, val_subjects=vs,
              train_subjects=np.arange(100, 130)).summary
    assert s["subject_exclusion"]
    s = match(train, val[:3], syn, device="cpu", n_bootstrap=0, val_subjects=[1, 1, 1]).summary
    assert s["null_rate"] is not None and np.isnan(s["null_rate"])  # one subject: no split possible
    with pytest.raises(InputError, match="val_subjects"):
        match(train, val, syn, device="cpu", val_subjects=[1, 2])


def test_to_dir_writes_atomically(tmp_path) -> None:
    rng = np.random.default_rng(8)
    res = match(rng.normal(size=(20, 4)), rng.normal(size=(1, 4)), rng.normal(size=(5, 4)), device="cpu",
                n_bootstrap=10)
    paths = res.to_dir(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json", "synthetic_matches.csv",
                                                                    "train_matches.csv"]
    summary = json.loads(paths["summary"].read_text())
    assert summary["n_val"] == 1 and summary["null_rate"] is None  # one validation sample: no null split
    assert summary["threshold"] == pytest.approx(res.threshold)
    import pandas as pd

    assert len(pd.read_csv(paths["train_matches"])) == 20
    assert len(pd.read_csv(paths["synthetic_matches"])) == 5


# ------------------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize("bad, message, row", [
    (np.ones(5), "2-D", None),
    (np.ones((0, 5)), "no samples", None),
    (np.ones((3, 0)), "0 features", None),
    (np.array([[1.0, 2.0], [np.nan, 1.0]]), "NaN", 1),
    (np.array([[1.0, 2.0], [0.0, 1.0], [np.inf, 1.0]]), "NaN or Inf", 2),
    (np.array([[1.0, 2.0], [3.0, 3.0]]), "zero variance", 1),
    (np.array([["a", "b"]]), "real numbers", None),
])
def test_validate_embeddings_rejects(bad: np.ndarray, message: str, row) -> None:
    with pytest.raises(InputError, match=message) as err:
        validate_embeddings(bad, "x.npy")
    assert err.value.row == row and err.value.source == "x.npy"


def test_match_rejects_mismatched_dims_and_bad_args() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    with pytest.raises(InputError, match=r"synthetic: embedding dimension 3 does not match train \(dimension 4\)"):
        match(a, a, b, device="cpu")
    with pytest.raises(InputError, match="percentile"):
        match(a, a, a, percentile=120, device="cpu")
    with pytest.raises(InputError, match="n_bootstrap"):
        match(a, a, a, n_bootstrap=-1, device="cpu")
    with pytest.raises(InputError, match="k"):
        topk_correlation(a, a, k=0, device="cpu")


def test_load_embeddings_formats(tmp_path) -> None:
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "a.npz", emb=x)
    torch.save(torch.from_numpy(x), tmp_path / "a.pt")
    for name in ["a.npy", "a.npz", "a.pt"]:
        np.testing.assert_array_equal(load_embeddings(tmp_path / name), x)


def test_resolve_device() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu() -> None:
    rng = np.random.default_rng(0)
    train, val, syn = rng.normal(size=(500, 32)), rng.normal(size=(400, 32)), rng.normal(size=(300, 32))
    a = match(train, val, syn, device="cpu", n_bootstrap=0, dtype="float64")
    b = match(train, val, syn, device="cuda", n_bootstrap=0, dtype="float64")
    assert a.threshold == pytest.approx(b.threshold, abs=1e-9)
    np.testing.assert_array_equal(a.train_table["best_synthetic_index"], b.train_table["best_synthetic_index"])
    np.testing.assert_allclose(a.train_table["correlation"], b.train_table["correlation"], atol=1e-9)


def test_match_refine_hook_is_the_plain_search_when_it_keeps_the_top_candidate() -> None:
    """``refine`` returning each query's first candidate reproduces match() exactly; a refine that re-scores
    changes τ and every statistic consistently; a malformed return is an input error."""
    rng = np.random.default_rng(3)
    train = rng.normal(size=(60, 12))
    val = rng.normal(size=(40, 12))
    syn = np.concatenate([train[:10] + 0.05 * rng.normal(size=(10, 12)), rng.normal(size=(30, 12))])
    calls: list[tuple[str, str, int]] = []

    def first(query, rows, reference, candidates, values):
        calls.append((query, reference, candidates.shape[1]))
        return values[:, 0], candidates[:, 0]

    subjects = dict(train_subjects=[f"t{i // 3}" for i in range(60)], val_subjects=[f"v{i // 4}" for i in range(40)])
    plain = match(train, val, syn, device="cpu", n_bootstrap=0, **subjects)
    hooked = match(train, val, syn, device="cpu", n_bootstrap=0, refine=first, refine_k=3, **subjects)
    for key in ("threshold", "n_memorized_train", "n_copies_synthetic", "null_rate", "null_rate_copies"):
        assert hooked.summary[key] == pytest.approx(plain.summary[key], abs=1e-12), key
    assert hooked.summary["refined"] and not plain.summary["refined"]
    np.testing.assert_array_equal(hooked.train_table["best_synthetic_index"], plain.train_table["best_synthetic_index"])
    np.testing.assert_array_equal(hooked.synthetic_table["best_train_index"], plain.synthetic_table["best_train_index"])
    np.testing.assert_allclose(hooked.best_val_for_synthetic, plain.best_val_for_synthetic, atol=1e-12)
    assert {(q, r) for q, r, _ in calls} == {("train", "val"), ("val", "train"), ("train", "synthetic"),
                                             ("synthetic", "train"), ("synthetic", "val")}
    assert all(k == 3 for _, _, k in calls)

    def squash(query, rows, reference, candidates, values):  # a different score: τ follows it
        return np.tanh(values[:, 0]), candidates[:, 0]

    squashed = match(train, val, syn, device="cpu", n_bootstrap=0, refine=squash)
    assert squashed.summary["n_copies_synthetic"] == plain.summary["n_copies_synthetic"]  # monotone: same flags
    assert squashed.threshold < plain.threshold

    # a refine scoring each pair in two ways gives two score sets, as best_of does with two feature sets (here the
    # same score twice, so the same as best_of with the same features again)
    def twice(query, rows, reference, candidates, values):
        score, index = first(query, rows, reference, candidates, values)
        return np.stack([score, score], axis=1), np.stack([index, index], axis=1)

    two = match(train, val, syn, device="cpu", n_bootstrap=0, refine=twice, **subjects)
    both = match(train, val, syn, device="cpu", n_bootstrap=0, best_of=[(train, val, syn)], **subjects)
    assert two.summary["feature_set_thresholds"] == pytest.approx(both.summary["feature_set_thresholds"], abs=1e-12)
    for key in ("threshold", "n_memorized_train", "n_copies_synthetic", "null_rate", "null_rate_copies"):
        assert two.summary[key] == pytest.approx(both.summary[key], abs=1e-9), key
    np.testing.assert_allclose(two.best_train_for_synthetic, both.best_train_for_synthetic, atol=1e-9)
    values, indices = best_of_correlation([], [], two.summary["feature_set_thresholds"],
                                          refined=twice("synthetic", None, "train",
                                                        np.argsort(-pearson(syn, train, device="cpu").numpy(),
                                                                   axis=1)[:, :5],
                                                        np.sort(pearson(syn, train, device="cpu").numpy(),
                                                                axis=1)[:, ::-1][:, :5]), device="cpu")
    np.testing.assert_allclose(values, two.best_train_for_synthetic, atol=1e-6)
    np.testing.assert_array_equal(indices, two.synthetic_table["best_train_index"])

    for bad in (lambda q, r, ref, c, v: (v[:-1, 0], c[:-1, 0]), lambda q, r, ref, c, v: (v, c[:, 0]),
                lambda q, r, ref, c, v: (v[:, : 1 + (q == "synthetic")], c[:, : 1 + (q == "synthetic")])):
        with pytest.raises(InputError, match="refine"):
            match(train, val, syn, device="cpu", n_bootstrap=0, refine=bad)
    with pytest.raises(InputError, match="refine_k"):
        match(train, val, syn, device="cpu", n_bootstrap=0, refine=first, refine_k=0)


def test_match_best_of_feature_sets_is_the_null_scaled_maximum() -> None:
    """``best_of``: each set's correlations scaled by its own τ_b, the best set per pair, τ recalibrated on that
    score — checked against dense scipy matrices; indices come from the winning set; bad triples are input errors."""
    rng = np.random.default_rng(11)
    n, m, s = 40, 30, 25
    emb = [rng.normal(size=(n, 8)), rng.normal(size=(m, 8)), rng.normal(size=(s, 8))]
    pix = [rng.normal(size=(n, 20)), rng.normal(size=(m, 20)), rng.normal(size=(s, 20))]
    emb[2][:4] = emb[0][:4] + 0.05 * rng.normal(size=(4, 8))  # copies only the embedding sees
    pix[2][4:7] = pix[0][10:13] + 0.05 * rng.normal(size=(3, 20))  # copies only the pixels see
    subjects = dict(train_subjects=[f"t{i // 2}" for i in range(n)], val_subjects=[f"v{i // 3}" for i in range(m)])
    got = match(*emb, device="cpu", n_bootstrap=50, dtype="float64", best_of=[pix], **subjects)

    scaled = []
    for t, v, y in (emb, pix):
        tau_b = np.percentile(corr(t, v).max(axis=1), 95.0)
        scaled.append(((corr(t, v) - tau_b) / (1 - tau_b), (corr(t, y) - tau_b) / (1 - tau_b),
                       (corr(y, v) - tau_b) / (1 - tau_b), tau_b))
    assert got.summary["feature_set_thresholds"] == pytest.approx([scaled[0][3], scaled[1][3]], abs=1e-12)
    tv = np.maximum(scaled[0][0], scaled[1][0])
    ts = np.maximum(scaled[0][1], scaled[1][1])
    tau = np.percentile(tv.max(axis=1), 95.0)
    assert got.threshold == pytest.approx(tau, abs=1e-12)
    np.testing.assert_allclose(got.best_train_for_synthetic, ts.max(axis=0), atol=1e-12)
    np.testing.assert_allclose(got.best_synthetic_for_train, ts.max(axis=1), atol=1e-12)
    np.testing.assert_allclose(got.best_val_for_synthetic, np.maximum(scaled[0][2], scaled[1][2]).max(axis=1),
                               atol=1e-12)
    np.testing.assert_array_equal(got.synthetic_table["best_train_index"], ts.argmax(axis=0))
    np.testing.assert_array_equal(got.train_table["best_synthetic_index"], ts.argmax(axis=1))
    flagged = np.flatnonzero(got.synthetic_table["copy"])
    assert set(range(7)) <= set(flagged)  # both kinds of copies
    assert got.synthetic_table["best_train_index"][4:7].tolist() == [10, 11, 12]
    for alone in (match(*emb, device="cpu", n_bootstrap=0), match(*pix, device="cpu", n_bootstrap=0)):
        assert not set(range(7)) <= set(np.flatnonzero(alone.synthetic_table["copy"]))
    assert np.isfinite(got.summary["null_rate"]) and got.summary["threshold_ci95"] is not None
    assert "feature_set_thresholds" not in match(*emb, device="cpu", n_bootstrap=0).summary

    with pytest.raises(InputError, match=r"best_of\[0\] val.*rows"):
        match(*emb, device="cpu", n_bootstrap=0, best_of=[(pix[0], pix[1][:-1], pix[2])])
    with pytest.raises(InputError, match=r"best_of\[0\]"):
        match(*emb, device="cpu", n_bootstrap=0, best_of=[(pix[0], pix[1])])


def test_match_null_views_calibrate_their_set_on_every_version_of_the_validation_rows() -> None:
    """``null_views``: a best_of set's τ_b is the null over its validation rows and their other versions (the audit's
    low-resolution validation pixels), checked against dense matrices beside a refined first set; the other sets and
    the synthetic → validation column are untouched; misshapen views are input errors naming them."""
    rng = np.random.default_rng(13)
    n, m, s = 40, 30, 25
    emb = [rng.normal(size=(n, 8)), rng.normal(size=(m, 8)), rng.normal(size=(s, 8))]
    pix = [rng.normal(size=(n, 20)), rng.normal(size=(m, 20)), rng.normal(size=(s, 20))]
    pix[2][4:7] = pix[0][10:13] + 0.05 * rng.normal(size=(3, 20))
    view = 0.6 * pix[1] + 0.4 * pix[0][:m]  # validation rows that resemble training rows more
    subjects = dict(train_subjects=[f"t{i // 2}" for i in range(n)], val_subjects=[f"v{i // 3}" for i in range(m)])

    def squash(query, rows, reference, candidates, values):
        return np.tanh(values[:, 0]), candidates[:, 0]

    kwargs = dict(device="cpu", n_bootstrap=0, dtype="float64", best_of=[pix, emb], refine=squash, refine_k=3)
    plain = match(*emb, **kwargs, **subjects)
    got = match(*emb, **kwargs, null_views=[[view], []], **subjects)
    blocks = []
    for (t, v, y), f, extra in ((emb, np.tanh, None), (pix, None, view), (emb, None, None)):
        tv, ty, yv = (corr(a, b) for a, b in ((t, v), (t, y), (y, v)))
        if f is not None:
            tv, ty, yv = f(tv), f(ty), f(yv)
        null = tv if extra is None else np.maximum(tv, corr(t, extra))
        tau_b = np.percentile(null.max(axis=1), 95.0)
        blocks.append([(x - tau_b) / (1 - tau_b) for x in (null, ty, yv)] + [tau_b])
    taus = got.summary["feature_set_thresholds"]
    assert taus == pytest.approx([b[3] for b in blocks], abs=1e-12)
    before = plain.summary["feature_set_thresholds"]
    assert taus[1] > before[1] and taus[0] == before[0] and taus[2] == before[2]
    tv, ts, sv = (np.max([b[k] for b in blocks], axis=0) for k in range(3))
    assert got.threshold == pytest.approx(np.percentile(tv.max(axis=1), 95.0), abs=1e-12)
    np.testing.assert_allclose(got.best_train_for_synthetic, ts.max(axis=0), atol=1e-12)
    np.testing.assert_allclose(got.best_val_for_synthetic, sv.max(axis=1), atol=1e-12)
    # the same views again change nothing: the null is a maximum over versions
    again = match(*emb, **kwargs, null_views=[[view, view, pix[1]], []], **subjects)
    assert again.summary["feature_set_thresholds"] == pytest.approx(taus, abs=1e-12)

    with pytest.raises(InputError, match=r"null_views\[0\]\[0\].*29 rows for 30"):
        match(*emb, **kwargs, null_views=[[view[:-1]], []])
    with pytest.raises(InputError, match=r"null_views.*one list per best_of set \(2\), got 1"):
        match(*emb, **kwargs, null_views=[[view]])
    with pytest.raises(InputError, match=r"null_views\[0\]\[0\]"):
        match(*emb, **kwargs, null_views=[[view[:, :5]], []])


def test_match_refine_with_best_of_rescores_the_first_set_only() -> None:
    """``refine`` + ``best_of``: the first set's values are its refine scores (here tanh of the top correlation), the
    other sets stay plain correlations, each scaled by its own τ_b — checked against dense matrices."""
    rng = np.random.default_rng(12)
    n, m, s = 40, 30, 25
    emb = [rng.normal(size=(n, 8)), rng.normal(size=(m, 8)), rng.normal(size=(s, 8))]
    pix = [rng.normal(size=(n, 20)), rng.normal(size=(m, 20)), rng.normal(size=(s, 20))]
    emb[2][:4] = emb[0][:4] + 0.05 * rng.normal(size=(4, 8))
    pix[2][4:7] = pix[0][10:13] + 0.05 * rng.normal(size=(3, 20))
    subjects = dict(train_subjects=[f"t{i // 2}" for i in range(n)], val_subjects=[f"v{i // 3}" for i in range(m)])
    calls: set[tuple[str, str]] = set()

    def squash(query, rows, reference, candidates, values):
        calls.add((query, reference))
        return np.tanh(values[:, 0]), candidates[:, 0]

    got = match(*emb, device="cpu", n_bootstrap=20, dtype="float64", best_of=[pix, emb], refine=squash, refine_k=3,
                **subjects)
    assert calls == {("train", "val"), ("val", "train"), ("train", "synthetic"), ("synthetic", "train"),
                     ("synthetic", "val")}
    blocks = []
    for (t, v, y), f in ((emb, np.tanh), (pix, None), (emb, None)):
        tv, ty, yv = (corr(a, b) for a, b in ((t, v), (t, y), (y, v)))
        if f is not None:
            tv, ty, yv = f(tv), f(ty), f(yv)
        tau_b = np.percentile(tv.max(axis=1), 95.0)
        blocks.append([(x - tau_b) / (1 - tau_b) for x in (tv, ty, yv)] + [tau_b])
    assert got.summary["feature_set_thresholds"] == pytest.approx([b[3] for b in blocks], abs=1e-12)
    tv, ts, sv = (np.max([b[k] for b in blocks], axis=0) for k in range(3))
    assert got.threshold == pytest.approx(np.percentile(tv.max(axis=1), 95.0), abs=1e-12)
    np.testing.assert_allclose(got.best_train_for_synthetic, ts.max(axis=0), atol=1e-12)
    np.testing.assert_allclose(got.best_synthetic_for_train, ts.max(axis=1), atol=1e-12)
    np.testing.assert_allclose(got.best_val_for_synthetic, sv.max(axis=1), atol=1e-12)
    np.testing.assert_array_equal(got.synthetic_table["best_train_index"], ts.argmax(axis=0))
    assert got.summary["refined"] and set(range(7)) <= set(np.flatnonzero(got.synthetic_table["copy"]))
    # images scored after the match (the audit's positive controls): the refined set's best plus the plain sets
    from memscan.metrics import best_of_correlation

    refined = (np.tanh(corr(emb[2], emb[0]).max(axis=1)), corr(emb[2], emb[0]).argmax(axis=1))
    values, indices = best_of_correlation([pix[2], emb[2]], [pix[0], emb[0]], got.summary["feature_set_thresholds"],
                                          refined=refined, device="cpu", dtype="float64")
    np.testing.assert_allclose(values, got.best_train_for_synthetic, atol=1e-12)
    np.testing.assert_array_equal(indices, got.synthetic_table["best_train_index"])
    with pytest.raises(InputError, match="refined block"):
        best_of_correlation([pix[2], emb[2]], [pix[0], emb[0]], got.summary["feature_set_thresholds"][1:],
                            refined=refined, device="cpu")


def test_blend_correlation_scores_superimposed_references_as_copies() -> None:
    """``blend_correlation``: a query superimposing two references scores 1 and names both; an exact copy names one;
    every score equals the dense greedy fit, lies between the best single correlation and the best fit over all
    pairs, and respects subject exclusion."""
    rng = np.random.default_rng(21)
    ref = rng.normal(size=(30, 40))
    query = rng.normal(size=(12, 40))
    query[0] = 0.65 * ref[3] + 0.35 * ref[17]
    query[1] = 2.0 * ref[5] + 1.0
    values, first, second = blend_correlation(query, ref, device="cpu", dtype="float64")
    assert values[0] == pytest.approx(1.0, abs=1e-9) and (first[0], second[0]) == (3, 17)
    assert values[1] == pytest.approx(1.0, abs=1e-9) and (first[1], second[1]) == (5, -1)
    np.testing.assert_allclose(values, dense_blend(query, ref), atol=1e-9)
    single = corr(query, ref)
    assert (values >= single.max(axis=1) - 1e-12).all()
    assert values[0] > single[0].max() + 0.05  # the blend is what catches it
    for n in range(len(query)):  # never above the best non-negative fit over every pair
        best = single[n].max()
        for i in range(len(ref)):
            for j in range(i + 1, len(ref)):
                a = np.stack([ref[i] - ref[i].mean(), ref[j] - ref[j].mean()], 1)
                w, *_ = np.linalg.lstsq(a, query[n] - query[n].mean(), rcond=None)
                if (w > 0).all():
                    best = max(best, float(np.corrcoef(query[n], a @ w)[0, 1]))
        assert values[n] <= best + 1e-9
    q_groups, r_groups = np.arange(12) % 3, np.arange(30) % 3
    values, first, second = blend_correlation(query, ref, query_groups=q_groups, reference_groups=r_groups,
                                              device="cpu", dtype="float64")
    np.testing.assert_allclose(values, dense_blend(query, ref, q_groups[:, None] != r_groups[None]), atol=1e-9)
    assert (r_groups[first] != q_groups).all() and all(r_groups[j] != g for j, g in zip(second, q_groups) if j >= 0)


def test_match_blend_sets_calibrate_and_search_on_two_source_fits() -> None:
    """``match(blend=...)``: that best_of set's τ_b is the percentile of each training row's best two-validation-row
    fit (its null views included), its synthetic scores the two-training-row fit, so a superimposed pair is a copy
    that plain correlations miss; ``best_of_correlation(blend=...)`` scores later images the same way; bad indices
    are one-line input errors."""
    rng = np.random.default_rng(22)
    n, m, s = 40, 30, 20
    emb = [rng.normal(size=(n, 8)), rng.normal(size=(m, 8)), rng.normal(size=(s, 8))]
    pix = [rng.normal(size=(n, 60)), rng.normal(size=(m, 60)), rng.normal(size=(s, 60))]
    pix[2][:4] = 0.55 * pix[0][[1, 5, 9, 13]] + 0.45 * pix[0][[20, 24, 28, 32]]  # blends of two training rows
    view = 0.7 * pix[1] + 0.3 * rng.normal(size=(m, 60))
    kwargs = dict(device="cpu", n_bootstrap=0, dtype="float64", headroom=0.8)
    plain = match(*emb, best_of=[pix], **kwargs)
    got = match(*emb, best_of=[pix, pix], blend=[1], null_views=[[view], [view]], **kwargs)
    assert got.summary["blended_sets"] == [1] and "blended_sets" not in plain.summary
    null = np.maximum(dense_blend(pix[0], pix[1]), dense_blend(pix[0], view))
    assert got.summary["feature_set_thresholds"][2] == pytest.approx(np.percentile(null, 95.0), abs=1e-12)
    assert not plain.synthetic_table["copy"][:4].any()
    assert got.synthetic_table["copy"][:4].all() and not got.synthetic_table["copy"][4:].any()
    assert got.synthetic_table["best_train_index"][:4].tolist() == [1, 5, 9, 13]
    assert got.synthetic_table["second_train_index"][:4].tolist() == [20, 24, 28, 32]  # both patients are named
    assert "second_train_index" not in plain.synthetic_table
    labelled = match(*emb, best_of=[pix, pix], blend=[1], train_ids=[f"t{i}.png" for i in range(n)], **kwargs)
    assert labelled.synthetic_table["second_train_id"][:4].tolist() == ["t20.png", "t24.png", "t28.png", "t32.png"]
    single = labelled.synthetic_table["second_train_index"] < 0
    assert single.any() and labelled.synthetic_table["second_train_id"][single].isna().all()
    taus = got.summary["feature_set_thresholds"]
    values, _ = best_of_correlation([emb[2], pix[2], pix[2]], [emb[0], pix[0], pix[0]], taus, blend=[2],
                                    device="cpu", dtype="float64")
    np.testing.assert_allclose(values, got.best_train_for_synthetic, atol=1e-12)

    for bad in ([2], [-1], [True], ["1"]):
        with pytest.raises(InputError, match=r"^blend: expected indices of best_of sets \(0 to 1\)"):
            match(*emb, best_of=[pix, pix], blend=bad, **kwargs)

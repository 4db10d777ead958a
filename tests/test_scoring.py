"""Tests for memscan.scoring: fused features give the weighted mean of Pearson correlations; flip invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memscan import scoring
from memscan.errors import InputError
from memscan.metrics import pearson
from memscan.scoring import flip_invariant_features, fuse_features, pixel_features, rank_rows, standardize_rows


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.corrcoef(a, b)[: len(a), len(a):]


def test_rank_rows_are_tie_averaged_ranks_and_ignore_increasing_intensity_curves() -> None:
    """Each row's ranks 1..D, ties given their average rank (as scipy's ``rankdata`` per row); an increasing curve
    (gamma) of an image leaves its ranks, hence its Spearman correlation with its source, unchanged."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(5, 9)).astype(float)  # many ties
    st = pytest.importorskip("scipy.stats")
    np.testing.assert_array_equal(rank_rows(x), st.rankdata(x, axis=1))
    np.testing.assert_array_equal(rank_rows(x[0]), st.rankdata(x[0]))
    np.testing.assert_array_equal(rank_rows(np.array([[3.0, 1.0, 3.0, 2.0]])), [[3.5, 1.0, 3.5, 2.0]])
    with pytest.MonkeyPatch.context() as mp:  # ranked in blocks of rows: the same ranks
        mp.setattr(scoring, "RANK_CHUNK_ROWS", 2)
        np.testing.assert_array_equal(rank_rows(x), st.rankdata(x, axis=1))
    image = np.r_[np.zeros(20), rng.random(80)]  # a background of zeros, as in a head MRI
    curved = image ** 2.2
    ranks = standardize_rows(rank_rows(np.stack([image, curved])))
    assert ranks[0] @ ranks[1] == pytest.approx(1.0, abs=1e-6)
    assert np.corrcoef(image, curved)[0, 1] < 0.97  # Pearson loses what Spearman keeps


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


# ------------------------------------------------------------------------------------------------------------------
# test-time geometric alignment
# ------------------------------------------------------------------------------------------------------------------
def _blob(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth zero-mean texture under a Gaussian envelope (object on an empty background), ``[1, *shape]``."""
    import torch

    rng = np.random.default_rng(seed)
    coarse = torch.as_tensor(rng.normal(size=(1, 1, *[max(3, s // 5) for s in shape])), dtype=torch.float32)
    tex = torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear" if len(shape) == 2 else "trilinear",
                                          align_corners=False)[0].numpy()
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    envelope = np.exp(-sum(g ** 2 for g in grids) / (2 * 0.3 ** 2))
    return (tex * envelope).astype(np.float32)


def _affine(img: np.ndarray, deg: float, zoom: float, shift: tuple[float, ...]) -> np.ndarray:
    """MONAI's own affine warp (rotation in the last two axes, zoom of the content in that plane, translation)."""
    from monai.transforms import Affine

    dims = img.ndim - 1
    rot = np.deg2rad(deg) if dims == 2 else (np.deg2rad(deg), 0.0, 0.0)
    scale = (1 / zoom, 1 / zoom) if dims == 2 else (1.0, 1 / zoom, 1 / zoom)
    out = Affine(rotate_params=rot, scale_params=scale, translate_params=shift, padding_mode="zeros",
                 image_only=True)(img)
    return np.asarray(out, dtype=np.float32)


def test_align_recovers_rotated_zoomed_shifted_copy():
    from memscan.scoring import ALIGN_SCALES, align_and_correlate

    ref = np.stack([_blob(0, (32, 32)), _blob(1, (32, 32))])
    zoom = ALIGN_SCALES[-2]  # a zoom of the grid, a rotation of the grid, whole-pixel shifts
    copy_ = _affine(ref[0], 9.0, zoom, (2.0, -3.0))
    mirrored = np.flip(_affine(ref[1], -6.0, 1.0, (-2.0, 1.0)), axis=-1).copy()
    unrelated = _blob(7, (32, 32))
    queries = np.stack([copy_, mirrored, unrelated])
    plain = pearson(queries.reshape(3, -1), ref.reshape(2, -1), device="cpu").numpy()
    assert plain[0, 0] < 0.8 and plain[1, 1] < 0.8  # unaligned, the copies do not look like copies
    res = align_and_correlate(queries, ref, np.array([[0, 1], [0, 1], [0, 1]]))
    assert res.pixel[0, 0] > 0.99 and res.pixel[1, 1] > 0.99
    assert res.index.tolist()[:2] == [0, 1]
    # an unrelated image stays well below a copy even after the search (the envelopes alone correlate)
    assert res.score[2] < 0.8 and res.pixel[0, 1] < 0.8 and res.pixel[1, 0] < 0.8
    # without the mirror in the group, the mirrored copy is not recovered
    no_flip = align_and_correlate(mirrored[None], ref, np.array([[1]]), flip_axes=())
    assert no_flip.pixel[0, 0] < 0.9
    # sub-pixel: a half-pixel shift is recovered better with the peak refinement than without
    half = _affine(ref[0], 0.0, 1.0, (0.5, 0.5))[None]
    with_sub = align_and_correlate(half, ref, np.array([[0]]), size=16).pixel[0, 0]
    without = align_and_correlate(half, ref, np.array([[0]]), size=16, subpixel=False).pixel[0, 0]
    assert with_sub > without


@pytest.mark.parametrize("shape", [(32, 32), (8, 32, 32)])
def test_align_refines_rotation_and_zoom_between_grid_values(shape):
    """A copy zoomed and rotated half-way between grid values lines up again with ``refine_rounds`` (as with a grid
    four times finer), an unrelated image gains little, and without rounds the result is the grid's."""
    from memscan.scoring import ALIGN_SCALES, align_and_correlate

    ref = np.stack([_blob(10, shape), _blob(11, shape)])
    zoom = float(np.sqrt(ALIGN_SCALES[4] * ALIGN_SCALES[5]))  # half-way between two grid zooms (log scale)
    queries = np.stack([_affine(ref[0], 4.5, zoom, (1.0,) * len(shape)), _blob(12, shape)])
    cand = np.array([[0], [0]])
    kw = dict(flip_axes=(), highpass=1.0)  # fine detail: a small misalignment shows
    grid = align_and_correlate(queries, ref, cand, **kw)
    assert np.array_equal(grid.pixel, align_and_correlate(queries, ref, cand, refine_rounds=0, **kw).pixel)
    refined = align_and_correlate(queries, ref, cand, refine_rounds=2, **kw)
    fine = align_and_correlate(queries, ref, cand, angles=np.arange(-12, 12.1, 0.75),
                               scales=np.geomspace(0.8, 1.25, 25), **kw)
    assert refined.pixel[0, 0] > grid.pixel[0, 0] + 0.005  # the copy lines up better: as well as on the fine grid
    assert refined.pixel[0, 0] == pytest.approx(fine.pixel[0, 0], abs=1e-3)
    assert (refined.pixel >= grid.pixel - 1e-6).all()  # the grid's best warp is kept when nothing beats it
    # the rounds subdivide the grid within its range: never above the fine grid's best, for any pair
    assert (refined.pixel <= fine.pixel + 1e-5).all()


def _texture(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth random texture filling the whole field of view (no empty background), ``[1, *shape]``."""
    import torch

    rng = np.random.default_rng(seed)
    coarse = torch.as_tensor(rng.normal(size=(1, 1, *[max(3, s // 3) for s in shape])), dtype=torch.float32)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear" if len(shape) == 2 else "trilinear",
                                           align_corners=False)[0].numpy().astype(np.float32)


@pytest.mark.parametrize("shape", [(32, 32), (6, 32, 32)])
def test_align_rewarps_a_copy_zoomed_into_a_corner(shape):
    """A crop of an image's corner, resized back to the full size, lines up at ~1 only when the best warp is applied
    with its shift (``rewarp``): the circular search zooms about the centre and loses the strip it cuts off. A copy
    rotated within its frame lines up once the reference is high-passed after its warp. An unrelated image gains
    almost nothing, and re-warping never lowers a pair's score."""
    from monai.transforms import Resize

    from memscan.scoring import align_and_correlate

    ref = np.stack([_texture(20, shape), _texture(21, shape)])
    crop = ref[0][(slice(None),) + (slice(None),) * (len(shape) - 2) + (slice(0, 26), slice(0, 26))]
    copy_ = np.asarray(Resize(spatial_size=shape, mode="bilinear")(crop), dtype=np.float32)  # a 1.23× zoom
    queries = np.stack([copy_, _texture(22, shape)])
    cand = np.array([[0, 1], [0, 1]])
    kw = dict(flip_axes=(), highpass=1.0, refine_rounds=2)
    circular = align_and_correlate(queries, ref, cand, rewarp=False, **kw)
    direct = align_and_correlate(queries, ref, cand, **kw)
    assert direct.pixel[0, 0] > 0.97
    assert circular.pixel[0, 0] < direct.pixel[0, 0] - 0.05
    assert (direct.pixel >= circular.pixel - 1e-6).all()
    assert direct.pixel[1].max() < 0.5 and (direct.pixel[1] - circular.pixel[1]).max() < 0.05
    # a copy rotated within its frame has the frame's edges in its high-pass: so does a reference warped before it
    rotated = _affine(ref[0], 10.0, 1.0, (2.0, -1.0) if len(shape) == 2 else (0.0, 2.0, -1.0))[None]
    assert align_and_correlate(rotated, ref, cand[:1, :1], **kw).pixel[0, 0] > 0.98
    assert align_and_correlate(rotated, ref, cand[:1, :1], rewarp=False, **kw).pixel[0, 0] < 0.95


def test_align_fuses_feature_scores_and_skips_missing_candidates():
    from memscan.scoring import align_and_correlate

    ref = np.stack([_blob(s, (16, 16)) for s in range(3)])
    q = ref[[2, 0]]
    cand = np.array([[2, 1], [-1, 0]])
    feats = np.array([[0.2, 0.9], [0.5, 0.4]])
    res = align_and_correlate(q, ref, cand, feature_scores=feats, weights={"pixel": 1.0, "features": 3.0})
    np.testing.assert_allclose(res.fused[0], (res.pixel[0] + 3 * feats[0]) / 4)
    assert res.fused[1, 0] == -np.inf and res.index[1] == 0
    np.testing.assert_allclose(res.pixel[1, 1], 1.0, atol=1e-5)
    none = align_and_correlate(q[:1], ref, np.array([[-1, -1]]))
    assert none.index[0] == -1 and none.score[0] == -np.inf


def test_align_scores_each_pair_as_if_alone():
    """Pairs are grouped by reference (each reference warped once per step): every pair's score equals the search
    of that query against that candidate alone, whatever the step size."""
    from memscan.scoring import align_and_correlate

    ref = np.stack([_blob(s, (16, 16)) for s in range(4)])
    q = np.stack([_affine(ref[i % 4], 3.0 * (i % 3), 1.0, (1.0, -1.0)) for i in range(7)])
    cand = np.array([[0, 1], [1, -1], [3, 0], [2, 2], [-1, -1], [1, 3], [0, 2]])
    kwargs = {"angles": (-3.0, 0.0, 3.0, 6.0), "scales": (1.0, 1.1), "highpass": 1.5}
    whole = align_and_correlate(q, ref, cand, **kwargs)
    for budget in (1, 3000):
        np.testing.assert_allclose(align_and_correlate(q, ref, cand, budget=budget, **kwargs).pixel, whole.pixel,
                                   atol=1e-6)
    for i, j in zip(*np.nonzero(cand >= 0)):
        alone = align_and_correlate(q[i:i + 1], ref, cand[i:i + 1, j:j + 1], **kwargs)
        np.testing.assert_allclose(alone.pixel[0, 0], whole.pixel[i, j], atol=1e-6)
    assert (whole.fused[cand < 0] == -np.inf).all() and whole.index[4] == -1


def test_align_device() -> None:
    """The search runs on the device asked for: an unknown device is a clear error, the CPU gives the default's
    scores wherever no GPU is present."""
    from memscan.scoring import align_and_correlate

    ref = np.stack([_blob(s, (16, 16)) for s in range(3)])
    cand = np.array([[0, 1], [2, 0]])
    with pytest.raises(InputError, match="device"):
        align_and_correlate(ref[:2], ref, cand, device="tpu")
    on_cpu = align_and_correlate(ref[:2], ref, cand, device="cpu", highpass=1.5)
    assert on_cpu.index.tolist() == [0, 2]
    if not torch.cuda.is_available():
        np.testing.assert_array_equal(align_and_correlate(ref[:2], ref, cand, highpass=1.5).pixel, on_cpu.pixel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("shape", [(32, 32), (8, 16, 16)])
def test_align_on_gpu_matches_cpu(shape) -> None:
    from memscan.scoring import align_and_correlate

    ref = np.stack([_blob(s, shape) for s in range(6)])
    q = np.stack([_affine(ref[i], 3.0 * i, 1.0, (1.0,) * len(shape)) for i in range(6)])
    cand = np.array([[i, (i + 1) % 6, -1] for i in range(6)])
    a = align_and_correlate(q, ref, cand, device="cpu", highpass=1.5, highpass_weight=0.5, refine_rounds=2)
    b = align_and_correlate(q, ref, cand, device="cuda", highpass=1.5, highpass_weight=0.5, refine_rounds=2)
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_allclose(a.pixel, b.pixel, atol=1e-4)


def test_aligned_search_retrieves_and_verifies():
    from memscan.scoring import aligned_search

    ref = np.stack([_blob(s, (24, 24)) for s in range(6)])
    q = np.stack([_affine(ref[4], 6.0, 1.0, (1.0, 2.0)), _affine(ref[1], -3.0, 1.0, (0.0, -2.0))])
    # retrieval features: coarse pixels (the candidate list), scored with the same features
    res = aligned_search(q, ref, pixel_features(q, [8, 8]), pixel_features(ref, [8, 8]), k=3, device="cpu")
    assert res.index.tolist() == [4, 1]
    assert res.candidates.shape == (2, 3) and (res.pixel.max(axis=1) > 0.98).all()
    # same-subject pairs are never candidates
    res_g = aligned_search(q, ref, pixel_features(q, [8, 8]), pixel_features(ref, [8, 8]), k=3, device="cpu",
                           query_groups=["a", "b"], reference_groups=["x", "x", "x", "x", "a", "x"])
    assert 4 not in res_g.candidates[0]


def test_align_3d_in_plane():
    from memscan.scoring import align_and_correlate

    ref = np.stack([_blob(3, (12, 20, 20)), _blob(4, (12, 20, 20))])
    q = np.stack([_affine(ref[1], 6.0, 1.0, (1.0, 1.0, -1.0))])
    res = align_and_correlate(q, ref, np.array([[0, 1]]), angles=(-6.0, -3.0, 0.0, 3.0, 6.0), scales=(1.0,),
                              max_shift=0.1)
    assert res.index[0] == 1 and res.pixel[0, 1] > 0.98 and res.pixel[0, 0] < 0.8
    small = align_and_correlate(q, ref, np.array([[1]]), size=(6, 10, 10), scales=(1.0,))
    assert small.pixel.shape == (1, 1) and np.isfinite(small.pixel).all()


def test_align_rejects_bad_input():
    from memscan.scoring import align_and_correlate

    ref = np.stack([_blob(0, (16, 16))] * 2)
    q = ref[:1]
    ok = np.array([[0]])
    cases = [
        (dict(query_images=q[0], reference_images=ref, candidates=ok), "spatial"),
        (dict(query_images=q, reference_images=ref[:, :, :8], candidates=ok), "differs"),
        (dict(query_images=q, reference_images=ref, candidates=np.array([[2]])), r"\[0, 2\)"),
        (dict(query_images=q, reference_images=ref, candidates=np.array([[0.5]])), "integer"),
        (dict(query_images=q, reference_images=ref, candidates=ok, feature_scores=np.zeros((1, 2))), "shape"),
        (dict(query_images=q, reference_images=ref, candidates=ok, feature_scores=np.array([[np.nan]])), "NaN"),
        (dict(query_images=q, reference_images=ref, candidates=ok, plane=(0, 0)), "two different"),
        (dict(query_images=q, reference_images=ref, candidates=ok, plane=(0, 2)), "spatial axes"),
        (dict(query_images=q, reference_images=ref, candidates=ok, max_shift=0.5), "fraction"),
        (dict(query_images=q, reference_images=ref, candidates=ok, refine_rounds=-1), "non-negative integer"),
        (dict(query_images=q, reference_images=ref, candidates=ok, refine_rounds=True), "non-negative integer"),
        (dict(query_images=q, reference_images=ref, candidates=ok, rewarp="yes"), "True or False"),
        (dict(query_images=q, reference_images=ref, candidates=ok, scales=(0.0,)), "positive"),
        (dict(query_images=np.zeros_like(q), reference_images=ref, candidates=ok), "constant"),
        (dict(query_images=q, reference_images=ref, candidates=ok, highpass=0.0), "blur"),
        (dict(query_images=q, reference_images=ref, candidates=ok, highpass=True), "blur"),
        (dict(query_images=q, reference_images=ref, candidates=ok, highpass=2.0, highpass_weight=0.0), "share"),
        (dict(query_images=np.full_like(q, 0.5), reference_images=ref, candidates=ok, highpass=2.0), "finer"),
        (dict(query_images=q, reference_images=ref, candidates=ok, feature_scores=np.zeros((1, 1)),
              weights={"pixel": -1.0, "features": 1.0}), "non-negative"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            align_and_correlate(**kwargs)


def test_align_highpass_ignores_the_shared_outline():
    """Two different objects inside the same silhouette line up by the silhouette; high-passed, only a copy does."""
    import torch

    from memscan.scoring import _highpass, align_and_correlate

    yy, xx = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    outline = np.exp(-(xx ** 2 / 0.7 + yy ** 2) / 0.3).astype(np.float32)  # the smooth shape every subject shares
    rng = np.random.default_rng(0)
    ref = np.stack([(outline + 0.5 * rng.normal(size=(32, 32)) * outline)[None] for _ in range(2)]).astype(np.float32)
    copy_ = _affine(ref[0], 6.0, 1.0, (1.0, -2.0))[None]
    other = (outline + 0.5 * rng.normal(size=(32, 32)) * outline)[None, None].astype(np.float32)
    cand = np.array([[0]])
    both = np.concatenate([copy_, other])
    plain = align_and_correlate(both, ref, np.array([[0], [0]]))
    hp = align_and_correlate(both, ref, np.array([[0], [0]]), highpass=2.0)
    assert plain.pixel[1, 0] > 0.8 and plain.pixel[0, 0] > 0.99  # unrelated detail, same outline: high plain r
    assert hp.pixel[1, 0] < 0.4 and hp.pixel[0, 0] > 0.99  # high-passed: the copy stays, the stranger drops
    assert align_and_correlate(ref[:1], ref, cand, highpass=2.0).pixel[0, 0] == pytest.approx(1.0, abs=1e-5)
    # a share of plain pixels: the same warp and shift scores (1 - w) r(plain) + w r(high-passed)
    fixed = dict(angles=(0.0,), scales=(1.0,), flip_axes=(), max_shift=0.0, subpixel=False)
    parts = [align_and_correlate(both, ref, np.array([[0, 1], [0, 1]]), **fixed, **kw).pixel
             for kw in ({}, {"highpass": 2.0})]
    mixed = align_and_correlate(both, ref, np.array([[0, 1], [0, 1]]), highpass=2.0, highpass_weight=0.25, **fixed)
    np.testing.assert_allclose(mixed.pixel, 0.75 * parts[0] + 0.25 * parts[1], atol=1e-5)
    half = align_and_correlate(both, ref, np.array([[0], [0]]), highpass=2.0, highpass_weight=0.5)
    assert hp.pixel[1, 0] < half.pixel[1, 0] < plain.pixel[1, 0] and half.pixel[0, 0] > 0.99
    # the blur runs in the plane only: a 3D volume's slices are filtered independently
    vol = torch.from_numpy(rng.normal(size=(1, 1, 3, 16, 16)).astype(np.float32))
    per_slice = torch.cat([_highpass(vol[:, :, i], 2.0, (0, 1))[:, :, None] for i in range(3)], dim=2)
    torch.testing.assert_close(_highpass(vol, 2.0, (1, 2)), per_slice)


def test_align_reports_progress_on_long_searches(monkeypatch, caplog):
    """A search longer than ``PROGRESS_SECONDS`` logs how many candidate pairs are done and the time left."""
    import logging

    import memscan.scoring as scoring

    ref = np.stack([_blob(s, (16, 16)) for s in range(4)])
    cand = np.array([[i, (i + 1) % 4] for i in range(4)])
    with caplog.at_level(logging.INFO, logger="memscan.scoring"):
        quiet = scoring.align_and_correlate(ref, ref, cand, budget=1, device="cpu")
        assert not caplog.records  # under PROGRESS_SECONDS: silent
        monkeypatch.setattr(scoring, "PROGRESS_SECONDS", 0.0)
        said = scoring.align_and_correlate(ref, ref, cand, budget=1, device="cpu")  # one pair per step
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("aligning: 1 of 8 candidate pairs (12%), about ") and lines[0].endswith(" min left")
    assert len(lines) == 7 and np.array_equal(quiet.pixel, said.pixel)


# ------------------------------------------------------------------------------------------------------------------
# test-time non-rigid alignment
# ------------------------------------------------------------------------------------------------------------------
def _elastic(img: np.ndarray, seed: int) -> np.ndarray:
    """MONAI's own elastic warp (control points 8 px apart, offsets of 1.5 px), the way a generator may bend a copy."""
    from monai.transforms import Rand2DElastic, Rand3DElastic

    dims = img.ndim - 1
    t = (Rand2DElastic(spacing=8, magnitude_range=(1.5, 1.5), prob=1.0, padding_mode="zeros") if dims == 2 else
         Rand3DElastic(sigma_range=(3.0, 3.0), magnitude_range=(40.0, 40.0), prob=1.0, padding_mode="zeros"))
    t.set_random_state(seed=seed)
    return np.asarray(t(img), dtype=np.float32)


@pytest.mark.parametrize("shape", [(40, 40), (8, 24, 24)])
def test_deform_recovers_an_elastically_warped_copy(shape):
    from memscan.scoring import _highpass, deform_and_correlate

    ref = np.stack([_blob(s, shape) for s in range(3)])
    queries = np.stack([_elastic(ref[0], 1), _elastic(ref[1], 2), _blob(9, shape)])
    cand = np.array([[0, 1], [1, 2], [0, 1]])
    plane = (len(shape) - 2, len(shape) - 1)
    # the score leaves out ceil(max_displacement) + 1 = 4 px at every edge (at most a quarter of the axis)
    interior = (Ellipsis, *(slice(min(4, n // 4), n - min(4, n // 4)) for n in shape))
    hp = [_highpass(torch.as_tensor(x), 1.0, plane).numpy()[interior].reshape(len(x), -1) for x in (queries, ref)]
    before = pearson(hp[0], hp[1], device="cpu").numpy()
    found = deform_and_correlate(queries, ref, cand, spacing=8.0)
    # no bending: the plain Pearson correlation of the high-passed pair
    still = deform_and_correlate(queries, ref, cand, spacing=8.0, iterations=0)
    np.testing.assert_allclose(still.pixel, before[np.arange(3)[:, None], cand], atol=1e-5)
    # the warped copies come back close to their sources, far above where they started and above unrelated pairs
    assert found.pixel[0, 0] > max(0.85, before[0, 0] + 0.1) and found.pixel[1, 0] > max(0.85, before[1, 1] + 0.1)
    assert found.index.tolist()[:2] == [0, 1]
    assert found.score[2] < found.pixel[0, 0] - 0.2 and found.pixel[0, 1] < found.pixel[0, 0] - 0.2
    np.testing.assert_array_equal(found.fused, found.pixel)
    # coarse-to-fine (a broad high-pass first, then the fit's own; by L-BFGS in 3D, as the audit fits there): the
    # same copies, the same ranking
    staged = deform_and_correlate(queries, ref, cand, spacing=6.0, fit_highpass=[4.0, 2.0], learning_rate=0.15,
                                  optimizer="lbfgs" if len(shape) == 3 else "adam")
    assert staged.pixel[0, 0] > max(0.85, before[0, 0] + 0.1) and staged.pixel[1, 0] > max(0.85, before[1, 1] + 0.1)
    assert staged.index.tolist()[:2] == [0, 1] and staged.score[2] < staged.pixel[0, 0] - 0.2


@pytest.mark.parametrize("shape, plane", [((3, 2, 40, 40), (0, 1)), ((2, 1, 12, 20, 16), (1, 2)),
                                          ((2, 1, 20, 6, 16), (0, 2))])
def test_highpass_is_monais_separable_gaussian_filter(shape, plane):
    """The matrix form of the high-pass equals MONAI's separable Gaussian filter with replicated edges, at every pixel
    (also where the kernel is longer than the axis); a constant image high-passes to exactly zero."""
    from monai.networks.layers import gaussian_1d, separable_filtering

    from memscan.scoring import _highpass

    x = torch.as_tensor(np.random.default_rng(0).random(shape), dtype=torch.float32)
    for sigma in (1.0, 2.0, 4.0):
        kernel = gaussian_1d(torch.tensor(sigma), truncated=3.0, approx="sampled", normalize=True)
        kernels = [kernel if a in plane else torch.ones(1) for a in range(x.ndim - 2)]
        np.testing.assert_allclose(_highpass(x, sigma, plane).numpy(),
                                   (x - separable_filtering(x, kernels, mode="replicate")).numpy(), atol=1e-6)
    assert float(_highpass(torch.full(shape, 0.5), 2.0, plane).abs().max()) == 0.0


def test_deform_keeps_a_stretched_copys_fine_detail():
    """Real MRI slices stretched as the detection benchmark's strong elastic family does come back at r > 0.97 with
    the audit's own 2D fit: the source is bent first and high-passed after, as the copy was (high-passing the source
    before bending it left 0.90-0.96 here), while another slice stays far below."""
    from monai.transforms import LoadImage, Rand2DElastic, Resize

    from memscan.audit import ALIGN_DEFORM
    from memscan.data import demo_data_dir
    from memscan.scoring import deform_and_correlate

    files = sorted((demo_data_dir() / "mri2d" / "train").glob("*.png"))[::4][:4]
    ref = []
    for f in files:
        img = Resize((64, 64), mode="area")(LoadImage(image_only=True, ensure_channel_first=True)(str(f)).float())
        ref.append(np.asarray(img / img.max(), dtype=np.float32))
    copies = []
    for seed, img in enumerate(ref):
        warp = Rand2DElastic(spacing=12, magnitude_range=(1.5, 1.5), prob=1.0, padding_mode="zeros")
        warp.set_random_state(seed=seed)
        copies.append(np.asarray(warp(img), dtype=np.float32))
    cand = np.stack([np.arange(4), (np.arange(4) + 2) % 4], axis=1)  # its source, then another slice
    settings = {k: v for k, v in ALIGN_DEFORM[2].items() if k not in scoring.BEND_CHOICE}
    found = deform_and_correlate(np.stack(copies), np.stack(ref), cand, **settings)
    assert found.pixel[:, 0].min() > 0.97 and found.pixel[:, 1].max() < 0.9
    assert found.index.tolist() == [0, 1, 2, 3]


def test_deform_3d_brings_back_a_stretched_slab():
    """Real MRI slabs (the 3D demo's, at the detection benchmark's 12 × 32² grid) warped as its strong 3D elastic
    family come back with the audit's own 3D fit, most of them at r > 0.95, while another subject's slab stays under
    0.8 (round 22's fit, ≤ 2 voxels for 30 steps per stage, left two of these copies at 0.84 and 0.89; rounds 23-25's,
    Adam on a trilinear field, brought them to 0.92, 0.92, 0.96, 0.97; round 26's L-BFGS on a cubic field to 0.90,
    0.96, 0.97, 0.99)."""
    from monai.transforms import LoadImage, Rand3DElastic, Resize

    from memscan.audit import ALIGN_DEFORM
    from memscan.data import demo_data_dir
    from memscan.scoring import deform_and_correlate

    root = demo_data_dir() / "mri3d"
    files = sorted((root / "train").glob("*.nii.gz"))[:4] + sorted((root / "unseen").glob("*.nii.gz"))[:1]
    ref = []
    for f in files:  # [1, X, Y, Z] → [1, Z, X, Y]: the axial plane last, as the benchmark's slabs
        img = LoadImage(image_only=True, ensure_channel_first=True)(str(f)).float().permute(0, 3, 1, 2)
        img = Resize((12, 32, 32), mode="area")(img)
        ref.append(np.asarray(img / img.max(), dtype=np.float32))
    copies = []
    for seed, img in enumerate(ref[:4]):
        warp = Rand3DElastic(sigma_range=(3.0, 3.0), magnitude_range=(60.0, 60.0), prob=1.0, padding_mode="zeros")
        warp.set_random_state(seed=seed)
        copies.append(np.asarray(warp(img), dtype=np.float32))
    cand = np.stack([np.arange(4), np.full(4, 4)], axis=1)  # its source, then the other subject's slab
    settings = {k: v for k, v in ALIGN_DEFORM[3].items() if k not in scoring.BEND_CHOICE}
    found = deform_and_correlate(np.stack(copies), np.stack(ref), cand, device="cpu", **settings)
    assert found.pixel[:, 0].min() > 0.88 and np.median(found.pixel[:, 0]) > 0.95 and found.pixel[:, 1].max() < 0.8
    assert found.index.tolist() == [0, 1, 2, 3]


def test_deform_leaves_out_what_the_warp_pulled_in_at_the_edges():
    """A copy whose border the generator filled from beyond the image (here: zeros) still matches its source: the
    score leaves out the band the field can reach, where no bending of the source reproduces the query."""
    from memscan.scoring import deform_and_correlate

    rng = np.random.default_rng(0)
    ref = rng.random((2, 1, 32, 32)).astype(np.float32)  # detail up to every edge, as in a radiograph
    query = ref[:1].copy()
    query[..., :3, :], query[..., -3:, :], query[..., :, :3], query[..., :, -3:] = 0, 0, 0, 0
    cand = np.array([[0, 1]])
    kept = deform_and_correlate(query, ref, cand, iterations=0)
    everything = deform_and_correlate(query, ref, cand, iterations=0, margin=0)
    assert kept.pixel[0, 0] > 0.99 and everything.pixel[0, 0] < 0.9
    assert kept.pixel[0, 1] < 0.2 and kept.index.tolist() == [0]


def test_cubic_basis_is_torchs_bicubic_in_2d_and_interpolates_in_3d():
    """The field's basis: in 2D exactly torch's bicubic upsampling of the control grid; in any dimensionality it
    reproduces a constant field exactly (a shift needs no wiggle) and passes through the control points (corners
    aligned, so a control point's value is the field's there)."""
    import torch.nn.functional as F

    from memscan.scoring import _cubic_basis

    points, spatial = [5, 7], [17, 25]
    n = int(np.prod(points))
    bicubic = F.interpolate(torch.eye(n).reshape(n, 1, *points), size=spatial, mode="bicubic", align_corners=True)
    np.testing.assert_allclose(_cubic_basis(points, spatial).numpy(), bicubic.reshape(n, -1).numpy(), atol=1e-6)
    points, spatial = [3, 4, 5], [9, 10, 13]
    basis = _cubic_basis(points, spatial).numpy()
    np.testing.assert_allclose(basis.sum(0), 1.0, atol=1e-5)
    # points 3, 4, 5 over 9, 10, 13 pixels: control points on pixels (0, 4, 8) x (0, 3, 6, 9) x (0, 3, 6, 9, 12)
    on_points = np.ravel_multi_index(np.meshgrid([0, 4, 8], [0, 3, 6, 9], [0, 3, 6, 9, 12], indexing="ij"), spatial)
    np.testing.assert_allclose(basis[:, on_points.reshape(-1)], np.eye(basis.shape[0]), atol=1e-5)


def test_pairwise_lbfgs_fits_every_row_on_its_own():
    """Rows of one batch are separate problems: each reaches its own minimum whatever its scale (a shared line
    search could not serve a row 10⁴ times steeper than its neighbour), and a row's path is the same alone and in a
    batch (its fit must not depend on the pairs it happens to share a batch with)."""
    from memscan.scoring import _pairwise_lbfgs

    rng = np.random.default_rng(0)
    n, d = 4, 6
    scale = torch.tensor([1e-2, 1.0, 10.0, 100.0])
    centre = torch.as_tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    mix = torch.as_tensor(rng.normal(size=(n, d, d)), dtype=torch.float32) / d ** 0.5 + torch.eye(d)

    asked = []

    def loss_of(rows):
        held = torch.arange(n)[rows]

        def loss(x, sub=None):  # an ill-conditioned quadratic plus a quartic per row
            own = held if sub is None else held[sub]
            asked.append(len(own))
            r = torch.einsum("nij,nj->ni", mix[own], x - centre[own])
            return scale[own] * ((r ** 2).sum(1) + 0.1 * (r ** 4).sum(1))
        return loss

    batch = torch.zeros(n, d, requires_grad=True)
    _pairwise_lbfgs(loss_of(slice(None)), batch, 40)
    np.testing.assert_allclose(batch.detach().numpy(), centre.numpy(), atol=1e-3)
    assert min(asked) < n  # a backtracking trial evaluates only the rows that failed the previous one
    for row in range(n):
        alone = torch.zeros(1, d, requires_grad=True)
        _pairwise_lbfgs(loss_of(slice(row, row + 1)), alone, 40)
        np.testing.assert_allclose(alone.detach().numpy()[0], batch.detach().numpy()[row], atol=1e-6)
    # max_step bounds every parameter's move in one step, and the fit still reaches each row's minimum
    bounded = torch.zeros(n, d, requires_grad=True)
    _pairwise_lbfgs(loss_of(slice(None)), bounded, 1, max_step=0.05)
    assert 0 < float(bounded.detach().abs().max()) <= 0.05 + 1e-6
    _pairwise_lbfgs(loss_of(slice(None)), bounded, 200, max_step=0.05)
    np.testing.assert_allclose(bounded.detach().numpy(), centre.numpy(), atol=1e-3)


def test_deform_lbfgs_scores_a_pair_the_same_in_any_batch():
    """With L-BFGS a pair's score does not depend on the batch it is fitted in (a budget of one pair per step against
    all pairs in one step), and it bends the warped copies back at least as far as Adam does."""
    from memscan.scoring import deform_and_correlate

    shape = (8, 24, 24)
    ref = np.stack([_blob(s, shape) for s in range(3)])
    queries = np.stack([_elastic(ref[0], 1), _elastic(ref[1], 2), _blob(9, shape)])
    cand = np.array([[0, 1], [1, 2], [0, 1]])
    settings = {"spacing": 6.0, "fit_highpass": [4.0, 2.0], "iterations": 30, "device": "cpu"}
    together = deform_and_correlate(queries, ref, cand, optimizer="lbfgs", **settings)
    one_by_one = deform_and_correlate(queries, ref, cand, optimizer="lbfgs", budget=1, **settings)
    # the copies' fits agree to float precision; an unrelated pair's rugged fit may amplify the last bits a batch's
    # size changes in a gradient (10⁻⁸) into a different local peak, but never into a copy's score
    np.testing.assert_allclose(together.pixel[:2, 0], one_by_one.pixel[:2, 0], atol=1e-5)
    np.testing.assert_allclose(together.pixel, one_by_one.pixel, atol=0.02)
    adam = deform_and_correlate(queries, ref, cand, **settings)
    assert together.pixel[0, 0] >= adam.pixel[0, 0] - 0.005 and together.pixel[1, 0] >= adam.pixel[1, 0] - 0.005
    assert together.index.tolist()[:2] == [0, 1] and together.score[2] < together.pixel[0, 0] - 0.2


def test_deform_skips_missing_candidates_and_rejects_bad_input():
    from memscan.scoring import deform_and_correlate

    ref = np.stack([_blob(s, (24, 24)) for s in range(2)])
    res = deform_and_correlate(ref, ref, np.array([[1, -1], [-1, -1]]), iterations=2)
    assert np.isfinite(res.pixel[0, 0]) and np.isneginf(res.pixel[0, 1]) and res.index.tolist() == [1, -1]
    for kwargs, what in [({"spacing": 0.0}, "spacing"), ({"max_displacement": -1.0}, "max_displacement"),
                         ({"iterations": 1.5}, "iterations"), ({"highpass": True}, "highpass"),
                         ({"margin": -1}, "margin"), ({"margin": 2.5}, "margin"),
                         ({"fit_highpass": []}, "fit_highpass"), ({"fit_highpass": [4.0, -2.0]}, "fit_highpass"),
                         ({"plane": (-1, -1)}, "plane"), ({"plane": ("x", -1)}, "plane"), ({"size": [4]}, "size"),
                         ({"optimizer": "sgd"}, "optimizer"), ({"max_step": 0.0}, "max_step"),
                         ({"max_step": True}, "max_step")]:
        with pytest.raises(InputError, match=what):
            deform_and_correlate(ref, ref, np.array([[0], [1]]), **kwargs)
    with pytest.raises(InputError, match="candidates"):
        deform_and_correlate(ref, ref, np.array([[2], [0]]))
    with pytest.raises(InputError, match="reference_images"):
        deform_and_correlate(ref, ref[:, :, :20], np.array([[0], [1]]))
    with pytest.raises(InputError, match="high-pass"):
        deform_and_correlate(np.ones((1, 1, 24, 24), np.float32), ref, np.array([[0]]))


def test_aligned_match_ranks_candidates_by_their_fused_score():
    """``AlignedMatch.ranked`` orders each query's candidates best first; missing ones last, ties in their order."""
    from memscan.scoring import AlignedMatch

    cand = np.array([[4, 7, 2], [5, 1, -1]])
    fused = np.array([[0.2, 0.9, 0.2], [0.1, 0.3, -np.inf]])
    found = AlignedMatch(score=fused.max(1), index=np.array([7, 1]), candidates=cand, pixel=fused, fused=fused)
    np.testing.assert_array_equal(found.ranked(), [[7, 4, 2], [1, 5, -1]])
    # the first two candidates of each row only (a shortlist's retrieval-own ones)
    np.testing.assert_array_equal(found.ranked(2), [[7, 4], [1, 5]])


def _cropped(img: np.ndarray, scale: float, corner: tuple[int, int]) -> np.ndarray:
    """A crop of ``scale`` of the image's last two axes from ``corner``, resized back (the detection benchmark's
    crop/resize family)."""
    from monai.transforms import Resize

    side = [int(round(scale * s)) for s in img.shape[-2:]]
    crop = img[..., corner[0]:corner[0] + side[0], corner[1]:corner[1] + side[1]]
    return np.asarray(Resize(spatial_size=img.shape[1:], mode="bilinear")(crop), dtype=np.float32)


def test_shortlist_adds_the_deep_candidate_a_quick_alignment_lines_up():
    """A copy cropped and enlarged by a quarter whose source the retrieval ranked 9th: the shortlist keeps the
    retrieval's first ``keep`` and adds the source from the rest, which the full alignment then scores near 1;
    without it the source is never aligned."""
    from memscan.scoring import aligned_search, shortlist_candidates

    ref = np.stack([_texture(40 + s, (32, 32)) for s in range(12)])
    queries = np.stack([_cropped(ref[9], 0.8, (4, 2)), _texture(99, (32, 32))])
    cand = np.tile(np.arange(12), (2, 1))  # the source 9th of 12 for the copy
    short = shortlist_candidates(queries, ref, cand, keep=3, extra=2, size=16, highpass=0.5, device="cpu")
    assert short.shape == (2, 5) and short.dtype == np.int64
    np.testing.assert_array_equal(short[:, :3], [[0, 1, 2], [0, 1, 2]])  # the retrieval's own first ones stay
    assert short[0, 3] == 9  # the source, added first from the rest
    assert len(set(short[1])) == 5 and set(short[1, 3:]) <= set(range(3, 12))  # an unrelated image gets two others
    # fewer left than asked for: all of them, without an alignment; nothing to add: the first ``keep``
    np.testing.assert_array_equal(shortlist_candidates(queries, ref, cand[:, :4], keep=3, extra=2), cand[:, :4])
    np.testing.assert_array_equal(shortlist_candidates(queries, ref, cand, keep=3, extra=0), cand[:, :3])
    # through aligned_search: features that rank the source 9th (a ramp of coarse values), then the alignment
    feats_r = np.eye(12, dtype=np.float32) + np.linspace(0, 1, 12, dtype=np.float32)[::-1][None]
    feats_q = np.stack([feats_r[0] + 0.01 * feats_r[9], feats_r[0]])
    kw = dict(k=3, device="cpu", flip_axes=(), highpass=1.0, refine_rounds=2,
              weights={"pixel": 1.0, "features": 0.0})
    plain = aligned_search(queries, ref, feats_q, feats_r, **kw)
    deep = aligned_search(queries, ref, feats_q, feats_r, shortlist={"depth": 12, "extra": 2, "factor": 2,
                                                                     "highpass": 0.5}, **kw)
    assert 9 not in plain.candidates[0] and plain.score[0] < 0.8
    assert deep.index[0] == 9 and deep.score[0] > 0.95
    assert deep.score[1] < 0.6  # the unrelated image stays unrelated
    np.testing.assert_array_equal(deep.candidates[:, :3], plain.candidates)


@pytest.mark.parametrize("kwargs", [{"keep": -1, "extra": 1}, {"keep": 2, "extra": 1.5}, {"keep": True, "extra": 1}])
def test_shortlist_rejects_bad_counts(kwargs):
    from memscan.scoring import shortlist_candidates

    ref = np.stack([_texture(s, (16, 16)) for s in range(3)])
    with pytest.raises(InputError, match="keep|extra"):
        shortlist_candidates(ref, ref, np.zeros((3, 3), dtype=int), **kwargs)
    with pytest.raises(InputError, match="candidates"):
        shortlist_candidates(ref, ref, np.zeros(3, dtype=int), keep=1, extra=1)


def test_bandpass_candidates_rank_only_the_given_candidates_by_their_band():
    """Each row's candidates re-ranked by the Pearson correlation of their band-passed pixels (σ 1 blur minus σ 4
    blur, written here with MONAI's separable Gaussian filter): a warped copy's source comes first, a reference
    outside a row's candidates never appears (a retrieval's exclusions hold), -1 entries stay last."""
    from monai.networks.layers import gaussian_1d, separable_filtering

    from memscan.scoring import bandpass_candidates

    ref = np.stack([_texture(60 + s, (32, 32)) for s in range(6)])
    queries = np.stack([_elastic(ref[4], 3), _elastic(ref[2], 4), _texture(98, (32, 32))])
    cand = np.array([[0, 1, 4, 5], [2, -1, 3, 0], [1, 3, 5, -1]])
    found = bandpass_candidates(queries, ref, cand, 3, band=(1.0, 4.0), device="cpu")
    assert found.shape == (3, 3) and found.dtype == np.int64
    assert found[0, 0] == 4 and found[1, 0] == 2  # the sources first
    for row, c in zip(found, cand):
        assert set(row[row >= 0]) <= set(c[c >= 0])
    assert set(found[1]) == {0, 2, 3}

    def band(x):
        blur = [separable_filtering(torch.as_tensor(x), [gaussian_1d(torch.tensor(s), truncated=3.0, approx="sampled",
                                                                     normalize=True)] * 2, mode="replicate")
                for s in (1.0, 4.0)]
        return (blur[0] - blur[1]).numpy().reshape(len(x), -1)

    r = pearson(band(queries), band(ref), device="cpu").numpy()
    for i, c in enumerate(cand):
        valid = c[c >= 0]
        np.testing.assert_array_equal(found[i][:min(3, len(valid))], valid[np.argsort(-r[i, valid], kind="stable")][:3])
    # more asked for than given: all of them, -1 last
    every = bandpass_candidates(queries, ref, cand, 9, band=(1.0, 4.0))
    assert every.shape == (3, 4) and every[1, 3] == every[2, 3] == -1 and (every[0] >= 0).all()
    np.testing.assert_array_equal(every[:, :3], found)


@pytest.mark.parametrize("kwargs, match", [({"k": 0}, "k"), ({"k": 2.0}, "k"), ({"k": 1, "band": (4.0, 1.0)}, "band"),
                                           ({"k": 1, "band": (0.0, 2.0)}, "band"), ({"k": 1, "band": 2.0}, "band")])
def test_bandpass_candidates_reject_bad_settings(kwargs, match):
    from memscan.scoring import bandpass_candidates

    ref = np.stack([_texture(s, (16, 16)) for s in range(3)])
    with pytest.raises(InputError, match=match) as err:
        bandpass_candidates(ref, ref, np.zeros((3, 2), dtype=int), **kwargs)
    assert "\n" not in str(err.value)


def test_merge_and_bend_candidates():
    """The rigid list first, then the band's candidates it lacks; a repeat or a missing one is -1 in place. With no
    ``band_k`` the bend list is the rigid one as it is."""
    from memscan.scoring import bend_candidates, merge_candidates

    merged = merge_candidates(np.array([[3, 1], [0, -1]]), np.array([[1, 7, 3], [2, 0, 2]]))
    np.testing.assert_array_equal(merged, [[3, 1, -1, 7, -1], [0, -1, 2, -1, -1]])
    with pytest.raises(InputError, match="candidates"):
        merge_candidates(np.zeros((2, 2), dtype=int), np.zeros((3, 1), dtype=int))
    ref = np.stack([_texture(60 + s, (32, 32)) for s in range(6)])
    queries = np.stack([_elastic(ref[4], 3), _texture(98, (32, 32))])
    ranked, pool = np.array([[0, 1], [1, 3]]), np.array([[0, 1, 4, 5], [1, 3, 5, 0]])
    np.testing.assert_array_equal(bend_candidates(queries, ref, ranked, pool), ranked)
    np.testing.assert_array_equal(bend_candidates(queries, ref, ranked, k=1), ranked[:, :1])  # the rigid first k
    bend = bend_candidates(queries, ref, ranked, pool, band_k=1, band=(1.0, 4.0), device="cpu")
    np.testing.assert_array_equal(bend[0], [0, 1, 4])  # the warped copy's source, added by its band
    assert bend[1, :2].tolist() == [1, 3] and bend[1, 2] in (-1, 5, 0)
    with pytest.raises(InputError, match="band_k"):
        bend_candidates(queries, ref, ranked, pool, band_k=-1)
    with pytest.raises(InputError, match="pool") as err:
        bend_candidates(queries, ref, ranked, band_k=1)
    assert "\n" not in str(err.value)

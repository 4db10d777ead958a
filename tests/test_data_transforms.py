"""Preprocessing and contrastive views (memscan.data.transforms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from memscan.data import (
    PreprocessConfig,
    load_image_set,
    make_dataset,
    preprocess_transforms,
    view_transforms,
)
from memscan.data.transforms import AUGMENT_PRESETS, LOWRES_ZOOM_RANGE, low_resolution
from memscan.errors import InputError

from conftest import make_array, write_nifti, write_png


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (PreprocessConfig(spatial_dims=2, spatial_size=24), (1, 24, 24)),
        (PreprocessConfig(spatial_dims=2, spatial_size=(20, 16), crop_pad_size=48), (1, 20, 16)),
        (PreprocessConfig(spatial_dims=2, spatial_size=40, resize=False), (1, 40, 40)),
    ],
)
def test_preprocess_2d_shape_and_range(tiny_2d_folder, cfg, expected):
    folder = tiny_2d_folder(n=2, size=(30, 36))
    rec = {"image": str(sorted(folder.glob("*.png"))[0])}
    out = preprocess_transforms(cfg)(rec)["image"]
    assert tuple(out.shape) == expected
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6
    assert float(out.max()) == pytest.approx(1.0)  # min-max scaled, not left in 0..255


def test_preprocess_rgb_and_16bit_to_one_channel(tmp_path):
    rgb = write_png(tmp_path / "rgb.png", np.stack([make_array((20, 20), s) for s in range(3)], -1))
    u16 = write_png(tmp_path / "u16.png", make_array((20, 20), 9, dtype="uint16"))
    pre = preprocess_transforms(PreprocessConfig(spatial_dims=2, spatial_size=16))
    for path in (rgb, u16):
        out = pre({"image": str(path)})["image"]
        assert tuple(out.shape) == (1, 16, 16)
        assert float(out.max()) == pytest.approx(1.0) and float(out.min()) == pytest.approx(0.0)


def test_preprocess_3d_paper_like_crop_pad_minus1_1(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", make_array((12, 20, 10), 1, "float32") * 500.0, spacing=(1, 1, 2))
    cfg = PreprocessConfig.paper_3d(spatial_size=(16, 16, 16))
    out = preprocess_transforms(cfg)({"image": str(path)})["image"]
    assert tuple(out.shape) == (1, 16, 16, 16)
    assert float(out.min()) == pytest.approx(-1.0) and float(out.max()) == pytest.approx(1.0)
    # pad value is background (-1), not mid-grey 0
    assert float(out[0, 0, 0, 0]) == pytest.approx(-1.0)


def test_paper_2d_defaults():
    cfg = PreprocessConfig.paper_2d()
    assert cfg.size == (512, 512) and cfg.crop_pad_size == 1024 and cfg.resize and cfg.intensity == "minmax"
    cfg3 = PreprocessConfig.paper_3d()
    assert cfg3.size == (32, 256, 256) and not cfg3.resize and cfg3.range == (-1.0, 1.0)
    assert cfg3.flip_axis == 2 and cfg3.rotate_axis == 0  # MRNet stacks: flip columns, rotate within slices
    assert AUGMENT_PRESETS["paper"] == ("flip", "rotate")


def test_preprocess_3d_spacing_and_orientation(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", make_array((10, 10, 5), 2, "float32"), spacing=(2, 2, 4))
    cfg = PreprocessConfig(spatial_dims=3, spatial_size=(20, 20, 20), resize=False, pixdim=(1.0, 1.0, 1.0))
    out = preprocess_transforms(cfg)({"image": str(path)})["image"]
    assert tuple(out.shape) == (1, 20, 20, 20)
    assert np.allclose(out.pixdim[:3].numpy(), 1.0)


def test_percentile_and_ct_window(tmp_path):
    arr = make_array((16, 16, 8), 3, "float32") * 2000.0 - 1000.0  # HU-like -1000..1000
    arr[0, 0, 0] = 30000.0  # outlier
    path = write_nifti(tmp_path / "ct.nii.gz", arr)
    rec = {"image": str(path)}
    pct = preprocess_transforms(
        PreprocessConfig(spatial_dims=3, spatial_size=(16, 16, 8), resize=False, intensity="percentile")
    )(rec)["image"]
    # outlier clipped: the bulk of voxels is spread over the range, not squashed near -1
    assert float(pct.median()) > -0.5
    ct = preprocess_transforms(
        PreprocessConfig(
            spatial_dims=3, spatial_size=(16, 16, 8), resize=False, intensity="ct_window", ct_window=(0.0, 200.0)
        )
    )(rec)["image"]
    hu = torch.as_tensor(arr)[None]
    assert torch.all(ct[hu <= -100] == -1.0) and torch.all(ct[hu >= 100] == 1.0)


def test_two_views_differ_and_are_independent(tiny_2d_folder):
    folder = tiny_2d_folder(n=1, size=(32, 32))
    cfg = PreprocessConfig(spatial_dims=2, spatial_size=32)
    chain = Compose([preprocess_transforms(cfg), view_transforms(cfg, "paper")])
    chain.set_random_state(seed=0)
    rec = {"image": str(next(folder.glob("*.png")))}
    diffs = []
    for _ in range(4):
        out = chain(rec)
        assert set(out) >= {"image", "view1", "view2"}
        assert out["view1"].shape == out["view2"].shape == out["image"].shape
        diffs.append(float((out["view1"] - out["view2"]).abs().mean()))
    assert min(diffs) > 0.0  # independent angles: the two views never coincide


def test_view_transforms_separate_instances():
    cfg = PreprocessConfig(spatial_dims=3, spatial_size=8)
    vt = view_transforms(cfg, "default")
    per_view = {"view1": [], "view2": []}
    for t in vt.transforms:
        keys = getattr(t, "keys", ())
        if len(keys) == 1 and keys[0] in per_view:
            per_view[keys[0]].append(t)
    assert len(per_view["view1"]) == len(per_view["view2"]) == len(AUGMENT_PRESETS["default"])
    assert not {id(t) for t in per_view["view1"]} & {id(t) for t in per_view["view2"]}


def test_view_transforms_3d_and_families(tiny_3d_folder):
    folder = tiny_3d_folder(n=1, size=(12, 12, 12))
    cfg = PreprocessConfig(spatial_dims=3, spatial_size=12, resize=False)
    chain = Compose(
        [preprocess_transforms(cfg), view_transforms(cfg, families=("noise", "smooth", "shift"), keep_image=False)]
    )
    chain.set_random_state(seed=1)
    out = chain({"image": str(next(folder.glob("*.nii.gz")))})
    assert "image" not in out and tuple(out["view1"].shape) == (1, 12, 12, 12)
    with pytest.raises(InputError, match="unknown"):
        view_transforms(cfg, families=("warp",))
    with pytest.raises(InputError, match="augment"):
        view_transforms(cfg, augment="heavy")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"intensity": "zscore"}, "intensity"),
        ({"spatial_dims": 3, "spatial_size": (4, 4)}, "spatial_size"),
        ({"flip_axis": 2}, "flip_axis"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        PreprocessConfig(**kwargs)


def test_wrong_dimensionality_names_file(tiny_3d_folder):
    folder = tiny_3d_folder(n=1, size=(8, 8, 8))
    path = str(next(folder.glob("*.nii.gz")))
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps transform errors
        preprocess_transforms(PreprocessConfig(spatial_dims=2, spatial_size=8))({"image": path})
    cause = info.value.__cause__
    assert isinstance(cause, InputError) and "expected a 2D image" in str(cause) and path in str(cause)


@pytest.mark.parametrize("persistent", [False, True])
def test_make_dataset_caches_preprocessing(tiny_2d_folder, tmp_path, persistent):
    folder = tiny_2d_folder(n=3, size=(20, 20))
    images = load_image_set(folder, "train")
    cfg = PreprocessConfig(spatial_dims=2, spatial_size=16)
    chain = Compose([preprocess_transforms(cfg), view_transforms(cfg)])
    cache = tmp_path / "cache" if persistent else None
    ds = make_dataset(images.records, chain, cache_dir=cache)
    assert len(ds) == 3
    if persistent:
        _ = [ds[i] for i in range(3)]
        assert len(list(cache.glob("*.pt"))) == 3
        # a different preprocessing config must not reuse the cached tensors
        other_cfg = PreprocessConfig(spatial_dims=2, spatial_size=8)
        other = Compose([preprocess_transforms(other_cfg), view_transforms(other_cfg)])
        assert tuple(make_dataset(images.records, other, cache_dir=cache)[0]["image"].shape) == (1, 8, 8)
        ds = make_dataset(images.records, chain, cache_dir=cache)  # a new run: served from disk
    for p in folder.glob("*.png"):
        p.unlink()  # from now on only the cache can serve the images
    a, b = ds[0], ds[0]
    assert tuple(a["image"].shape) == (1, 16, 16)
    assert torch.equal(a["image"], b["image"])  # deterministic part cached
    assert not torch.equal(a["view1"], b["view1"]) or not torch.equal(a["view2"], b["view2"])  # views stay random
    assert a["subject_id"] == images.records[0]["subject_id"]


@pytest.mark.parametrize("rotate_axis", [0, 2])
def test_3d_rotation_axis(rotate_axis):
    """Rotation about ``rotate_axis``: a volume constant along that axis stays constant along it."""
    from monai.transforms import RandRotated

    cfg = PreprocessConfig(spatial_dims=3, spatial_size=16, rotate_axis=rotate_axis, rotate_degrees=20)
    vt = view_transforms(cfg, families=("rotate",))
    rot = [t for t in vt.transforms if isinstance(t, RandRotated)][0]
    assert rot.rand_rotate.range_x[1] if rotate_axis == 0 else rot.rand_rotate.range_z[1]
    plane = torch.as_tensor(make_array((16, 16), 1, "float32"))
    vol = plane.unsqueeze(rotate_axis).expand(*[16] * 3).clone()[None]
    vt.set_random_state(seed=0)
    out = vt({"image": vol})["view1"][0]
    assert float((out - vol[0]).abs().mean()) > 1e-3
    ref = out.select(rotate_axis, 8)
    for k in (3, 12):
        torch.testing.assert_close(out.select(rotate_axis, k), ref, atol=1e-4, rtol=0)


def test_transform_fingerprint_follows_every_setting():
    """One cache key for the PersistentDataset and the embedding cache: equal settings, equal key; any change in a
    transform parameter, a new key; stable text (no object addresses)."""
    import json

    from monai.transforms import ScaleIntensityd

    from memscan.data.transforms import _describe, transform_fingerprint
    from memscan.embed import configured_preprocess

    base = PreprocessConfig(spatial_dims=2, spatial_size=32)
    key = transform_fingerprint(preprocess_transforms(base))
    assert len(key) == 64 and key == transform_fingerprint(preprocess_transforms(PreprocessConfig(2, 32)))
    assert key == transform_fingerprint(configured_preprocess(base))  # the embedding cache's view of the same chain
    assert key == transform_fingerprint(Compose([Compose(preprocess_transforms(base).transforms[:3]),
                                                 *preprocess_transforms(base).transforms[3:]]))  # nesting is no change
    changed = [dict(spatial_size=24), dict(crop_pad_size=64), dict(resize=False), dict(intensity="percentile"),
               dict(output_range=(-1.0, 1.0))]
    keys = {transform_fingerprint(preprocess_transforms(PreprocessConfig(**{"spatial_dims": 2, "spatial_size": 32,
                                                                            **c}))) for c in changed}
    assert key not in keys and len(keys) == len(changed)
    lo = transform_fingerprint(Compose([ScaleIntensityd("image", minv=0.0, maxv=1.0)]))
    assert lo != transform_fingerprint(Compose([ScaleIntensityd("image", minv=0.0, maxv=2.0)]))
    assert lo != transform_fingerprint(Compose([ScaleIntensityd("label", minv=0.0, maxv=1.0)]))
    for cfg in (base, PreprocessConfig.paper_3d(), PreprocessConfig(spatial_dims=3, spatial_size=8, pixdim=(1, 1, 1))):
        assert " at 0x" not in json.dumps(_describe(preprocess_transforms(cfg)), default=str)


@pytest.mark.parametrize("family", ["elastic", "lowres"])
@pytest.mark.parametrize("dims, size", [(2, (32, 32)), (3, (8, 16, 16))])
def test_artefact_families_change_the_view_and_keep_its_shape(family, dims, size):
    """elastic (MONAI Rand2DElastic / Rand3DElastic) and lowres (RandSimulateLowResolution): every applied draw
    changes the image, shapes and dtype are kept, and the two views draw independently."""
    cfg = PreprocessConfig(spatial_dims=dims, spatial_size=size, rotate_axis=0)
    vt = view_transforms(cfg, families=(family,), keep_image=True)
    for t in vt.transforms:
        if hasattr(t, "prob"):
            t.prob = 1.0  # apply on every draw (the preset's 0.3 is tested through the seeded chain below)
    vt.set_random_state(seed=0)
    grid = torch.linspace(0, 1, size[-1])
    img = (torch.sin(8 * grid)[None, :] * torch.cos(5 * grid)[:, None]).expand(*size).clone()[None]
    out = vt({"image": img})
    for view in ("view1", "view2"):
        assert tuple(out[view].shape) == (1, *size) and out[view].dtype == torch.float32
        assert float((out[view] - img).abs().mean()) > 1e-3
    assert not torch.equal(out["view1"], out["view2"])


def test_artefact_view_sizes_scale_with_the_image():
    from monai.transforms import Rand2DElasticd, Rand3DElasticd, RandGaussianSmoothd

    def first(cfg, cls):
        return [t for t in view_transforms(cfg, "default").transforms if isinstance(t, cls)][0]

    small = first(PreprocessConfig(spatial_dims=2, spatial_size=64), Rand2DElasticd).rand_2d_elastic
    large = first(PreprocessConfig(spatial_dims=2, spatial_size=256), Rand2DElasticd).rand_2d_elastic
    assert tuple(small.deform_grid.spacing) == (12, 12) and tuple(large.deform_grid.spacing) == (48, 48)
    assert large.deform_grid.magnitude[1] == pytest.approx(4 * small.deform_grid.magnitude[1]) == pytest.approx(6.0)
    e3 = first(PreprocessConfig(spatial_dims=3, spatial_size=64), Rand3DElasticd).rand_3d_elastic
    assert e3.sigma_range == (6.0, 6.0)
    blur = first(PreprocessConfig(spatial_dims=2, spatial_size=128), RandGaussianSmoothd).rand_smooth
    assert blur.sigma_x == pytest.approx((0.5, 2.4))


@pytest.mark.parametrize("dims", [2, 3])
def test_default_views_seeded_reproducible(dims):
    cfg = PreprocessConfig(spatial_dims=dims, spatial_size=16 if dims == 2 else (8, 16, 16))
    img = torch.rand(1, *cfg.size, generator=torch.Generator().manual_seed(0))

    def views(seed):
        vt = view_transforms(cfg, "default", keep_image=False)
        vt.set_random_state(seed=seed)
        return [vt({"image": img}) for _ in range(3)]

    a, b, c = views(5), views(5), views(6)
    for x, y in zip(a, b):
        assert set(x) == {"view1", "view2"}
        torch.testing.assert_close(x["view1"], y["view1"])
        torch.testing.assert_close(x["view2"], y["view2"])
    assert any(not torch.equal(x["view1"], z["view1"]) for x, z in zip(a, c))


def test_view_fingerprint_follows_the_families():
    from memscan.data.transforms import transform_fingerprint

    cfg = PreprocessConfig(spatial_dims=2, spatial_size=32)
    default = transform_fingerprint(view_transforms(cfg, "default"))
    assert default == transform_fingerprint(view_transforms(cfg, families=AUGMENT_PRESETS["default"]))
    others = {transform_fingerprint(view_transforms(cfg, families=f)) for f in [
        ("flip", "rotate", "affine", "contrast", "noise"),  # memscan's previous default
        tuple(f for f in AUGMENT_PRESETS["default"] if f != "elastic"),
        tuple(f for f in AUGMENT_PRESETS["default"] if f != "lowres"),
        AUGMENT_PRESETS["paper"],
    ]}
    assert default not in others and len(others) == 4
    assert {"elastic", "lowres"} <= set(AUGMENT_PRESETS["default"])


def test_anti_aliased_resize_averages_on_reduction_and_interpolates_on_enlargement() -> None:
    """A reduction is area averaging (each output pixel the mean of the block it covers); an enlargement (or a
    mixed shape) interpolates; 2D and 3D share the path."""
    from memscan.data.transforms import AntiAliasedResized

    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.random((1, 8, 12)), dtype=torch.float32)
    out = AntiAliasedResized("image", (4, 6))({"image": img})["image"]
    blocks = img.reshape(1, 4, 2, 6, 2).mean(dim=(2, 4))
    np.testing.assert_allclose(np.asarray(out), blocks.numpy(), rtol=1e-5, atol=1e-6)
    grown = AntiAliasedResized("image", (16, 6))({"image": img})["image"]  # one axis grows: interpolation
    assert tuple(grown.shape) == (1, 16, 6)
    assert float(grown.min()) >= float(img.min()) - 1e-6 and float(grown.max()) <= float(img.max()) + 1e-6
    vol = torch.as_tensor(rng.random((1, 4, 8, 8)), dtype=torch.float32)
    small = AntiAliasedResized("image", (2, 4, 4), mode="trilinear")({"image": vol})["image"]
    np.testing.assert_allclose(np.asarray(small), vol.reshape(1, 2, 2, 4, 2, 4, 2).mean(dim=(2, 4, 6)).numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, factors", [((1, 8, 12), (2, 3)), ((2, 16, 16), (4, 4)), ((1, 4, 8, 6), (2, 2, 3)),
                                            ((1, 6, 10), (1, 5))])
def test_box_reduce_equals_area_interpolation(shape, factors) -> None:
    """The strided-slice box filter is torch's area interpolation (to float rounding), in 2D and 3D, and the
    resize gives the same pixels on plain tensors (box filter) and on MetaTensors (MONAI ``Resize``)."""
    import torch.nn.functional as F
    from monai.data import MetaTensor

    from memscan.data.transforms import AntiAliasedResized, box_reduce

    img = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    size = [s // f for s, f in zip(shape[1:], factors)]
    expected = F.interpolate(img[None], size=size, mode="area")[0]
    got = box_reduce(img, factors)
    assert tuple(got.shape) == tuple(expected.shape)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    resize = AntiAliasedResized("image", size)
    plain = resize({"image": img.clone()})["image"]
    meta = resize({"image": MetaTensor(img.clone())})["image"]
    torch.testing.assert_close(torch.as_tensor(plain), torch.as_tensor(meta.as_tensor()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dims, size", [(2, (32, 48)), (3, (8, 16, 12))])
def test_min_max_once_after_resize_equals_before_and_after(tmp_path, dims, size) -> None:
    """With a resize (and no crop/pad), the chain scales intensities once, after resizing; the result equals
    scaling before and after the (linear) resize, the chain it replaced, for reductions and enlargements."""
    from monai.transforms import LoadImaged, ScaleIntensityd

    from memscan.data.transforms import AntiAliasedResized

    arr = (make_array(size, seed=3).astype(np.float32) * 3.5 - 100.0).astype(np.float32)
    path = write_nifti(tmp_path / "img.nii.gz", arr)
    for target in ([s // 2 for s in size], [s * 2 - 3 for s in size]):
        cfg = PreprocessConfig(spatial_dims=dims, spatial_size=target, orientation=None)
        chain = preprocess_transforms(cfg)
        assert sum(isinstance(t, ScaleIntensityd) for t in chain.transforms) == 1
        got = chain({"image": str(path)})["image"]
        ref = LoadImaged("image", image_only=True, ensure_channel_first=True)({"image": str(path)})["image"]
        lo, hi = cfg.range
        ref = ScaleIntensityd("image", minv=lo, maxv=hi)({"image": ref})
        ref = AntiAliasedResized("image", target, mode="bilinear" if dims == 2 else "trilinear")(ref)
        ref = ScaleIntensityd("image", minv=lo, maxv=hi)(ref)["image"]
        torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(ref.as_tensor()).float(), rtol=1e-5,
                                   atol=2e-6)


@pytest.mark.parametrize("shape", [(1, 32, 32), (1, 8, 16, 16)])
def test_low_resolution_keeps_the_size_and_removes_fine_detail_only(shape):
    """``low_resolution``: the ``lowres`` view at one zoom (the audit's null views) keeps the shape, turns a
    one-pixel checkerboard into something else (nearest down-sampling aliases it) and leaves a smooth ramp as it was;
    a tensor gives the same as its array."""
    grids = np.meshgrid(*[np.arange(n) for n in shape[1:]], indexing="ij")
    checker = (sum(grids) % 2).astype(np.float32)[None]
    ramp = (sum(grids) / sum(n - 1 for n in shape[1:])).astype(np.float32)[None]
    for zoom in LOWRES_ZOOM_RANGE:
        low = low_resolution(checker, zoom)
        assert low.shape == shape and low.dtype == np.float32
        assert np.abs(low - checker).mean() > 0.25  # the one-pixel pattern is gone
        smooth = low_resolution(ramp, zoom)
        assert np.corrcoef(smooth.ravel(), ramp.ravel())[0, 1] > 0.98
        np.testing.assert_array_equal(low_resolution(torch.from_numpy(checker), zoom), low)


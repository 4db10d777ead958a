"""Preprocessing and contrastive-view transforms (MONAI dictionary transforms on key ``"image"``).

Preprocessing is deterministic (cacheable with ``CacheDataset``/``PersistentDataset``, see :func:`make_dataset`);
random augmentation for the two contrastive views comes after the cache (:func:`view_transforms`).

Paper settings (Dar et al., 2025): 2D chest X-ray crop/pad to 1024² then resize to 512², per-image min-max;
3D knee MRI crop/pad to 32×256×256, min-max to [-1, 1]; views by ±5° rotation and horizontal flip.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, ImageReader, MetaTensor, PersistentDataset
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandShiftIntensityd,
    RandSimulateLowResolution,
    RandSimulateLowResolutiond,
    Resize,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SqueezeDim,
    Transform,
)

from memscan.data.readers import MemscanReader
from memscan.errors import InputError

__all__ = [
    "AUGMENT_FAMILIES",
    "AUGMENT_PRESETS",
    "VIEW_REFERENCE_SIZE",
    "INTENSITY_MODES",
    "PreprocessConfig",
    "ToGreyd",
    "EnsureSpatialDimsd",
    "AntiAliasedResized",
    "box_reduce",
    "LOWRES_ZOOM_RANGE",
    "low_resolution",
    "preprocess_transforms",
    "view_transforms",
    "make_dataset",
    "transform_fingerprint",
]

INTENSITY_MODES = ("minmax", "percentile", "ct_window")
#: View families (one random MONAI transform each; pixel-unit sizes scale with the configured size, see
#: :data:`VIEW_REFERENCE_SIZE`): flip (p 0.5, ``flip_axis``), rotate (±``rotate_degrees``), affine (±12° about the
#: rotation axis, ±8% shift, ±15% zoom), contrast (gamma 0.4-2.5, p 0.5), noise (σ 5% of the range, p 0.3), smooth
#: (Gaussian σ 0.25-1.2 px at 64², p 0.3), shift (intensity ±5%, p 0.5), elastic (2D grid 12 px / magnitude 1.5 px at
#: 64²; 3D σ 3 / magnitude 60 at 32³; p 0.3), lowres (down-sampling to 25-60% and back, p 0.3).
AUGMENT_FAMILIES = ("flip", "rotate", "affine", "contrast", "noise", "smooth", "shift", "elastic", "lowres")
AUGMENT_PRESETS: dict[str, tuple[str, ...]] = {
    "paper": ("flip", "rotate"),
    # views that imitate how generators reproduce training images (geometry, warps, blur, lost detail, noise, contrast):
    # the augmentation of the recipe that beat the paper's and pixel matching in benchmarks/detection
    "default": ("affine", "flip", "elastic", "smooth", "lowres", "noise", "contrast"),
}
#: image size (longest axis) at which the size-dependent view parameters below were measured (benchmarks/detection:
#: 64² slices, 12×32² slabs); they scale with the configured size so a view deforms the anatomy alike at any size
VIEW_REFERENCE_SIZE: dict[int, int] = {2: 64, 3: 32}


def _size(value: int | Sequence[int], dims: int, what: str) -> tuple[int, ...]:
    size = (int(value),) * dims if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(size) != dims or any(s < 1 for s in size):
        raise InputError(what, f"needs {dims} positive sizes for {dims}D images, got {value!r}")
    return size


@dataclass
class PreprocessConfig:
    """Deterministic preprocessing settings shared by training, embedding and reports.

    Args:
        spatial_dims: 2 or 3.
        spatial_size: final spatial size (int = same on every axis).
        crop_pad_size: optional centre crop / zero pad applied before resizing (paper 2D: 1024).
        resize: True resizes to ``spatial_size`` (anti-aliased); False crops/pads to it (paper 3D).
        intensity: ``minmax`` (per image), ``percentile`` (clip to ``percentiles`` then scale) or ``ct_window``.
        output_range: intensity range after scaling; None = (0, 1) for 2D, (-1, 1) for 3D (paper).
        percentiles: lower / upper percentile for ``percentile``.
        ct_window: (centre, width) in HU for ``ct_window``.
        orientation: axis codes for 3D images (None keeps the file's orientation); ignored in 2D.
        pixdim: optional 3D resampling spacing in mm (None keeps the file's spacing).
        flip_axis: spatial axis of the "horizontal" flip (0 = x for PIL images and RAS volumes; 2 = columns of an
            MRNet (slices, rows, columns) stack, as in :meth:`paper_3d`).
        rotate_degrees: maximum rotation of the contrastive views (paper ±5°).
        rotate_axis: 3D only, the axis rotated about: 2 (default) turns RAS volumes in the axial plane, 0 turns an
            MRNet stack within its slices (:meth:`paper_3d`).
        augment_families: view augmentation families (see ``AUGMENT_FAMILIES``); None uses the preset.
    """

    spatial_dims: int = 2
    spatial_size: int | Sequence[int] = 512
    crop_pad_size: int | Sequence[int] | None = None
    resize: bool = True
    intensity: str = "minmax"
    output_range: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (40.0, 400.0)
    orientation: str | None = "RAS"
    pixdim: Sequence[float] | None = None
    flip_axis: int = 0
    rotate_degrees: float = 5.0
    rotate_axis: int = 2
    augment_families: Sequence[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise InputError("spatial_dims", f"must be 2 or 3, got {self.spatial_dims!r}")
        if self.intensity not in INTENSITY_MODES:
            raise InputError("intensity", f"must be one of {', '.join(INTENSITY_MODES)}, got {self.intensity!r}")
        _size(self.spatial_size, self.spatial_dims, "spatial_size")
        if self.crop_pad_size is not None:
            _size(self.crop_pad_size, self.spatial_dims, "crop_pad_size")
        if not 0 <= self.flip_axis < self.spatial_dims:
            raise InputError("flip_axis", f"must be a spatial axis 0..{self.spatial_dims - 1}, got {self.flip_axis}")
        if self.rotate_axis not in (0, 1, 2):
            raise InputError("rotate_axis", f"must be 0, 1 or 2, got {self.rotate_axis}")
        if self.augment_families is not None:
            unknown = set(self.augment_families) - set(AUGMENT_FAMILIES)
            if unknown:
                raise InputError("augment_families", f"unknown {sorted(unknown)}; choose from {AUGMENT_FAMILIES}")

    @property
    def size(self) -> tuple[int, ...]:
        """``spatial_size`` as a tuple."""
        return _size(self.spatial_size, self.spatial_dims, "spatial_size")

    @property
    def range(self) -> tuple[float, float]:
        """Output intensity range."""
        if self.output_range is not None:
            return (float(self.output_range[0]), float(self.output_range[1]))
        return (0.0, 1.0) if self.spatial_dims == 2 else (-1.0, 1.0)

    @classmethod
    def paper_2d(cls, **overrides: Any) -> PreprocessConfig:
        """Paper chest X-ray setting: crop/pad to 1024², resize to 512², per-image min-max."""
        return replace(cls(spatial_dims=2, spatial_size=512, crop_pad_size=1024, resize=True), **overrides)

    @classmethod
    def paper_3d(cls, **overrides: Any) -> PreprocessConfig:
        """Paper knee MRI setting (MRNet (slices, rows, columns) stacks): crop/pad to 32×256×256, min-max to [-1, 1],
        horizontal flip along the columns, rotation within the slices."""
        base = cls(spatial_dims=3, spatial_size=(32, 256, 256), resize=False, flip_axis=2, rotate_axis=0)
        return replace(base, **overrides)


class ToGreyd(MapTransform):
    """Reduce a channel-first colour image to one grey channel (ITU-R BT.601 luma; alpha dropped).

    MONAI has no RGB-to-grey transform. One channel passes through unchanged; two channels (grey + alpha) keep the
    first.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            c = img.shape[0]
            if c == 1:
                continue
            if c in (3, 4):
                grey = 0.299 * img[0:1] + 0.587 * img[1:2] + 0.114 * img[2:3]
            else:
                grey = img[0:1]
            d[key] = grey
        return d


class EnsureSpatialDimsd(MapTransform):
    """Squeeze trailing singleton spatial axes (a 2D image stored as X×Y×1) to reach ``spatial_dims``.

    MONAI's ``SqueezeDimd`` raises a generic error on a non-singleton axis; this names the file and the shape.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            while img.ndim - 1 > self.spatial_dims and img.shape[-1] == 1:
                img = SqueezeDim(dim=img.ndim - 1)(img)
            if img.ndim - 1 != self.spatial_dims:
                source = getattr(img, "meta", {}).get("filename_or_obj", key)
                raise InputError(source, f"expected a {self.spatial_dims}D image, got shape {tuple(img.shape[1:])}")
            d[key] = img
        return d


class AntiAliasedResized(MapTransform):
    """Resize to ``spatial_size`` with anti-aliasing, the filter chosen per image: area averaging (MONAI ``Resize``
    ``mode="area"``: each output voxel the mean of the input voxels it covers, the exact box filter of a reduction)
    when no axis grows, else ``mode`` interpolation after MONAI's Gaussian anti-aliasing.

    Written because MONAI's ``Resized`` applies one mode to every input; the Gaussian filter costs ~6 ms of a
    512² → 256² image's ~10 ms of preprocessing, area averaging ~0.5 ms. When every axis shrinks by a whole
    factor (1024² or 512² → 256²), the same box means are summed from strided slices (:func:`box_reduce`).
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], mode: str = "bilinear",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.mode = mode
        self._reduce = Resize(self.spatial_size, mode="area")
        self._enlarge = Resize(self.spatial_size, mode=mode, anti_aliasing=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(int(s) for s in d[key].shape[1:])
            reduces = all(s >= t for s, t in zip(shape, self.spatial_size))
            factors = [s // t for s, t in zip(shape, self.spatial_size)]
            img = d[key]
            if reduces and all(s == f * t for s, f, t in zip(shape, factors, self.spatial_size)) \
                    and isinstance(img, torch.Tensor) and not isinstance(img, MetaTensor) and img.is_floating_point():
                d[key] = box_reduce(img, factors)  # plain tensors (the embedding loader): no metadata to update
            else:
                d[key] = (self._reduce if reduces else self._enlarge)(img)
        return d


def box_reduce(image: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Mean of each ``factors``-sized block of a channel-first image (area averaging by whole factors).

    Equal to ``torch.nn.functional.interpolate(mode="area")`` to float rounding. Written because torch's area and
    average pooling kernels take ~0.5-0.7 ms for a 512² float image on one CPU thread; the separable sum of strided
    slices here takes ~0.2 ms.

    Args:
        image: ``[C, *spatial]`` floating-point tensor whose spatial sizes are multiples of ``factors``.
        factors: the reduction factor per spatial axis.

    Returns:
        ``[C, *(spatial / factors)]`` tensor.
    """
    out, scale = image, 1.0
    for axis, f in enumerate(factors, start=1):
        if f == 1:
            continue
        parts = [out[(slice(None),) * axis + (slice(j, None, f),)] for j in range(f)]  # sizes are multiples of f
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        out, scale = total, scale * f
    return out.mul_(1.0 / scale) if out is not image else out.clone()


#: Zooms of the ``lowres`` view (down-sampling to this share of the size per axis, then back): the loss of detail of
#: an autoencoder / latent generator the default training preset teaches the encoder to see through.
LOWRES_ZOOM_RANGE = (0.25, 0.6)


def low_resolution(image: np.ndarray | torch.Tensor, zoom: float) -> np.ndarray:
    """A channel-first ``[C, *spatial]`` image down-sampled to ``zoom`` of its size per axis and back: the ``lowres``
    view at one zoom (MONAI's ``RandSimulateLowResolution``, nearest down-sampling, (bi/tri)linear up-sampling)."""
    t = RandSimulateLowResolution(prob=1.0, zoom_range=(zoom, zoom),
                                  upsample_mode="bilinear" if len(image.shape) == 3 else "trilinear")
    return np.asarray(t(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))), dtype=np.float32)


def preprocess_transforms(cfg: PreprocessConfig, keys: KeysCollection = "image") -> Compose:
    """Deterministic preprocessing: load, one grey channel, orientation/spacing (3D), intensity, size.

    Order: ``LoadImaged`` (explicit readers) → ``EnsureChannelFirstd`` → :class:`ToGreyd` →
    :class:`EnsureSpatialDimsd` → [3D: ``Orientationd``, ``Spacingd``] → intensity (``ScaleIntensityd`` /
    ``ScaleIntensityRangePercentilesd`` / ``ScaleIntensityRanged``) → [``ResizeWithPadOrCropd(crop_pad_size)``] →
    :class:`AntiAliasedResized` (then min-max again) or ``ResizeWithPadOrCropd`` → float32. Padding uses the lowest
    output intensity (background). Min-max scaling followed by the resize (a linear filter) and min-max again
    equals the resize then min-max, so with ``resize`` and no ``crop_pad_size`` min-max runs once, after resizing.

    Args:
        cfg: the settings.
        keys: key(s) holding image paths.

    Returns:
        A MONAI ``Compose`` (no random transform: safe to cache).
    """
    lo, hi = cfg.range
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")  # absent GPU reader registered by default
        load = LoadImaged(keys, reader=MemscanReader(), image_only=True)
    xs: list[Transform] = [
        load,
        EnsureChannelFirstd(keys),
        ToGreyd(keys),
        EnsureSpatialDimsd(keys, cfg.spatial_dims),
    ]
    if cfg.spatial_dims == 3:
        if cfg.orientation:
            xs.append(Orientationd(keys, axcodes=cfg.orientation, labels=None))
        if cfg.pixdim is not None:
            xs.append(Spacingd(keys, pixdim=tuple(float(p) for p in cfg.pixdim), mode="bilinear"))
    if cfg.intensity == "minmax":
        if not cfg.resize or cfg.crop_pad_size is not None:  # else min-max once after the (linear) resize suffices
            xs.append(ScaleIntensityd(keys, minv=lo, maxv=hi))
    elif cfg.intensity == "percentile":
        p_lo, p_hi = cfg.percentiles
        xs.append(ScaleIntensityRangePercentilesd(keys, lower=p_lo, upper=p_hi, b_min=lo, b_max=hi, clip=True))
    else:
        centre, width = cfg.ct_window
        xs.append(
            ScaleIntensityRanged(
                keys, a_min=centre - width / 2, a_max=centre + width / 2, b_min=lo, b_max=hi, clip=True
            )
        )
    if cfg.crop_pad_size is not None:
        xs.append(ResizeWithPadOrCropd(keys, _size(cfg.crop_pad_size, cfg.spatial_dims, "crop_pad_size"), value=lo))
    if cfg.resize:
        mode = "bilinear" if cfg.spatial_dims == 2 else "trilinear"
        xs.append(AntiAliasedResized(keys, cfg.size, mode=mode))
        if cfg.intensity == "minmax":
            xs.append(ScaleIntensityd(keys, minv=lo, maxv=hi))  # anti-aliasing narrows the range: restore it exactly
    else:
        xs.append(ResizeWithPadOrCropd(keys, cfg.size, value=lo))
    xs.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(xs)


def _view_chain(key: str, families: Sequence[str], cfg: PreprocessConfig) -> list[Transform]:
    """One view's random transforms, in ``families`` order (parameters: see :data:`AUGMENT_FAMILIES`)."""
    dims = cfg.spatial_dims
    rad = math.radians(cfg.rotate_degrees)
    span = cfg.range[1] - cfg.range[0]
    k = max(cfg.size) / VIEW_REFERENCE_SIZE[dims]  # size scale of pixel-unit parameters
    # 2D: the image plane; 3D: rotations turn about cfg.rotate_axis (MONAI's range_x/y/z rotate about axes 0/1/2)
    axis = 0 if dims == 2 else cfg.rotate_axis
    chain: list[Transform] = []
    for fam in families:
        if fam == "flip":
            chain.append(RandFlipd(key, prob=0.5, spatial_axis=cfg.flip_axis))
        elif fam == "rotate":
            ranges = {("range_x", "range_y", "range_z")[axis]: rad}
            chain.append(RandRotated(key, prob=1.0, keep_size=True, padding_mode="border", **ranges))
        elif fam == "affine":
            # ±12° about the rotation axis, ±8% shift within the rotated plane, ±15% zoom
            rotate = [0.0] * (1 if dims == 2 else 3)
            rotate[axis] = math.radians(12.0)
            shift = [0.0 if dims == 3 and a == axis else 0.08 * s for a, s in enumerate(cfg.size)]
            chain.append(
                RandAffined(
                    key,
                    prob=1.0,
                    rotate_range=rotate,
                    translate_range=shift,
                    scale_range=[0.15] * dims,
                    padding_mode="border",
                )
            )
        elif fam == "elastic":
            if dims == 2:
                spacing = [max(2, round(12 * k)) for _ in range(2)]
                chain.append(
                    Rand2DElasticd(key, spacing=spacing, magnitude_range=(0.0, 1.5 * k), prob=0.3,
                                   padding_mode="border")
                )
            else:
                # the Gaussian-smoothed random field shrinks as sigma^-1.5 in 3D: magnitude k^2.5 keeps the
                # displacement (in voxels) proportional to the size
                chain.append(
                    Rand3DElasticd(key, sigma_range=(3.0 * k, 3.0 * k), magnitude_range=(0.0, 60.0 * k**2.5),
                                   prob=0.3, padding_mode="border")
                )
        elif fam == "lowres":
            # down- then up-sampling: the loss of detail of an autoencoder / latent generator
            chain.append(
                RandSimulateLowResolutiond(key, prob=0.3, zoom_range=LOWRES_ZOOM_RANGE,
                                           upsample_mode="bilinear" if dims == 2 else "trilinear")
            )
        elif fam == "contrast":
            chain.append(RandAdjustContrastd(key, prob=0.5, gamma=(0.4, 2.5)))
        elif fam == "noise":
            chain.append(RandGaussianNoised(key, prob=0.3, std=0.05 * span))
        elif fam == "smooth":
            sigma = (0.25 * k, 1.2 * k)
            chain.append(RandGaussianSmoothd(key, prob=0.3, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma))
        elif fam == "shift":
            chain.append(RandShiftIntensityd(key, offsets=0.05 * span, prob=0.5))
    return chain


def view_transforms(
    cfg: PreprocessConfig,
    augment: str = "paper",
    *,
    families: Sequence[str] | None = None,
    keep_image: bool = True,
) -> Compose:
    """Two independent random views ``"view1"`` and ``"view2"`` of the preprocessed ``"image"``.

    Each view has its own transform instances (a MONAI dictionary transform draws once per call, so one instance
    applied to both keys would give both views the same flip and angle).

    Args:
        cfg: preprocessing settings (dimensionality, flip axis, rotation range, intensity range).
        augment: ``paper`` (±5° rotation + horizontal flip) or ``default`` (generator artefacts: affine, flip,
            elastic warp, blur, low resolution, noise, contrast; see :data:`AUGMENT_PRESETS`).
        families: explicit augmentation families (overrides ``augment`` and ``cfg.augment_families``).
        keep_image: keep the un-augmented ``"image"`` in the output.

    Returns:
        A MONAI ``Compose`` with random transforms (apply after the cache).
    """
    if families is None:
        families = cfg.augment_families
    if families is None:
        if augment not in AUGMENT_PRESETS:
            raise InputError("augment", f"must be one of {', '.join(AUGMENT_PRESETS)}, got {augment!r}")
        families = AUGMENT_PRESETS[augment]
    unknown = set(families) - set(AUGMENT_FAMILIES)
    if unknown:
        raise InputError("augment families", f"unknown {sorted(unknown)}; choose from {', '.join(AUGMENT_FAMILIES)}")
    xs: list[Transform] = [CopyItemsd("image", times=2, names=["view1", "view2"])]
    for view in ("view1", "view2"):
        xs.extend(_view_chain(view, families, cfg))
    xs.append(EnsureTyped(["view1", "view2"], dtype=torch.float32))
    if not keep_image:
        from monai.transforms import DeleteItemsd

        xs.append(DeleteItemsd("image"))
    return Compose(xs)


def _describe(obj: Any, depth: int = 0) -> Any:
    """JSON-able description of a transform's settings, stable across processes (no ids, no reader state)."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, torch.dtype):
        return str(obj)
    if isinstance(obj, (tuple, list)):
        return [_describe(o, depth + 1) for o in obj]
    if isinstance(obj, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return np.asarray(obj).tolist() if np.asarray(obj).size <= 64 else f"array{tuple(np.asarray(obj).shape)}"
    if isinstance(obj, Compose):  # nested chains describe like one flat chain (as the dataset caches see them)
        return [_describe(t, depth + 1) for t in obj.flatten().transforms]
    if isinstance(obj, functools.partial):
        return {"__partial__": _describe(obj.func, depth + 1), "args": _describe(obj.args, depth + 1),
                "keywords": _describe(obj.keywords, depth + 1)}
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if callable(obj) and hasattr(obj, "__qualname__"):  # a function or class used as a transform
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    if isinstance(obj, ImageReader) or depth >= 8 or not hasattr(obj, "__dict__"):
        return name
    attrs = {k: _describe(v, depth + 1) for k, v in sorted(vars(obj).items()) if not k.startswith("_") and k != "R"}
    return {"__class__": name, **attrs}


def transform_fingerprint(transforms: Any) -> str:
    """SHA-256 (hex) of a transform chain's settings: the cache key of preprocessed tensors and embeddings.

    Stable across processes and restarts (no object ids, random states or reader internals) and different whenever
    a transform's class or one of its public settings differs, so a changed preprocessing never reuses a stale
    cache entry. Used by :func:`make_dataset` (``PersistentDataset``) and :func:`memscan.embed.embed_images`.

    Args:
        transforms: a transform, a ``Compose`` (nested ones are flattened), a sequence of transforms, or any
            callable whose public attributes hold its settings (e.g. :func:`memscan.embed.configured_preprocess`).

    Returns:
        64 hex characters.
    """
    # MONAI's json_hashing falls back to class names only, so two preprocessing configs would share one cache
    text = json.dumps(_describe(transforms), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _persistent_hash(transforms: Sequence[Any]) -> bytes:
    """``PersistentDataset``'s ``hash_transform`` (it wants bytes): :func:`transform_fingerprint`."""
    return transform_fingerprint(list(transforms)).encode()


def make_dataset(
    records: Sequence[dict[str, Any]],
    transforms: Compose | Transform | None,
    cache_dir: str | Path | None = None,
    *,
    num_workers: int | None = 0,
    progress: bool = False,
) -> Dataset:
    """Dataset that decodes each file once: ``PersistentDataset`` on disk if ``cache_dir`` else ``CacheDataset``.

    Both cache the transform chain up to its first random transform, so pass ``Compose([preprocess, views])`` (nested
    ``Compose`` objects are flattened) and the views stay random per epoch.

    Args:
        records: record dicts (``image`` key and metadata).
        transforms: transform chain.
        cache_dir: folder for the persistent cache (created if missing); None caches in memory. Entries are keyed by
            the record and the deterministic transforms' settings, not by file content: clear it when files change.
        num_workers: threads used to fill the in-memory cache.
        progress: show a progress bar while caching.

    Returns:
        A MONAI dataset.
    """
    data = [dict(r) for r in records]
    if isinstance(transforms, Compose):
        # a nested Compose counts as random for the caches, which would then cache nothing: flatten it
        transforms = transforms.flatten()
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        # the transform chain is part of the cache key, so changing the preprocessing never reuses stale tensors
        return PersistentDataset(
            data, transform=transforms, cache_dir=Path(cache_dir), hash_transform=_persistent_hash
        )
    return CacheDataset(data, transform=transforms, cache_rate=1.0, num_workers=num_workers, progress=progress)

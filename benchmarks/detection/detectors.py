"""Detectors of the benchmark: a recipe (see ``presets.py``) fitted on training images → a feature extractor.

Scores are Pearson correlations of the extractor's rows (``memscan.metrics``), so every detector — pixels,
embeddings, fused, flip-invariant — goes through the same τ calibration and matching code as ``memscan match``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import ResNet
from monai.transforms import (
    Compose,
    CropForeground,
    Rand2DElastic,
    Rand3DElastic,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandRotate,
    RandSimulateLowResolution,
    Resize,
)

from memscan.data.transforms import PreprocessConfig, view_transforms
from memscan.networks import Encoder
from memscan.scoring import flip_invariant_features, fuse_features, pixel_features
from memscan.training import NTXentLoss

__all__ = ["AUGMENTATIONS", "view_transform", "train_contrastive", "embed", "canonical_frame", "fit_detector"]


def _paper(dims: int) -> list:
    # Dar et al.: random rotation within ±5° and horizontal flip (in-plane rotation for volumes)
    rot = {"range_x": np.deg2rad(5.0)} if dims == 2 else {"range_x": np.deg2rad(5.0), "range_y": 0.0, "range_z": 0.0}
    return [RandRotate(prob=1.0, padding_mode="zeros", **rot), RandFlip(prob=0.5, spatial_axis=dims - 1)]


def _artefacts(dims: int) -> list:
    """Views that imitate generator artefacts: geometry, intensity, texture and resolution changes."""
    rot = np.deg2rad(12.0) if dims == 2 else (np.deg2rad(12.0), 0.0, 0.0)
    shift = (0.08 * 64,) * 2 if dims == 2 else (0.0, 0.08 * 32, 0.08 * 32)
    elastic = (Rand2DElastic(spacing=12, magnitude_range=(0.0, 1.5), prob=0.3, padding_mode="zeros") if dims == 2
               else Rand3DElastic(sigma_range=(3.0, 3.0), magnitude_range=(0.0, 60.0), prob=0.3,
                                  padding_mode="zeros"))
    return [
        RandAffine(prob=1.0, rotate_range=rot, translate_range=shift, scale_range=0.15, padding_mode="zeros"),
        RandFlip(prob=0.5, spatial_axis=dims - 1),
        elastic,
        RandGaussianSmooth(prob=0.3, sigma_x=(0.25, 1.2), sigma_y=(0.25, 1.2), sigma_z=(0.25, 1.2)),
        RandSimulateLowResolution(prob=0.3, zoom_range=(0.25, 0.6),
                                  upsample_mode="bilinear" if dims == 2 else "trilinear"),
        RandGaussianNoise(prob=0.3, std=0.05),
        RandAdjustContrast(prob=0.5, gamma=(0.4, 2.5)),
    ]


AUGMENTATIONS: dict[str, Callable[[int], list]] = {"paper": _paper, "artefacts": _artefacts}


def view_transform(augment: str, spatial_dims: int, size: tuple[int, ...], seed: int) -> Callable:
    """``image [1, *spatial] -> (view1, view2)``, two independent random views (seeded for replay).

    ``augment`` is ``"memscan:<preset>"`` (memscan's own ``view_transforms``: ``paper`` / ``default``),
    ``"memscan:<family>+<family>..."`` (explicit memscan families) or a key of :data:`AUGMENTATIONS`.
    """
    if augment.startswith("memscan:"):
        name = augment.split(":", 1)[1]
        # benchmark layout: left-right is the last axis, slabs are [S-I, A-P, L-R] so axial rotation is about axis 0
        cfg = PreprocessConfig(spatial_dims=spatial_dims, spatial_size=list(size), output_range=(0.0, 1.0),
                               flip_axis=spatial_dims - 1, rotate_axis=0)
        kw = {"augment": name} if "+" not in name and name in ("paper", "default") else {"families": name.split("+")}
        t = view_transforms(cfg, keep_image=False, **kw)
        t.set_random_state(seed=seed)

        def both(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = t({"image": img})
            return torch.as_tensor(out["view1"]), torch.as_tensor(out["view2"])

        return both
    views = [Compose(AUGMENTATIONS[augment](spatial_dims)) for _ in range(2)]
    views[0].set_random_state(seed=seed)
    views[1].set_random_state(seed=seed + 1)
    return lambda img: (torch.as_tensor(views[0](img)), torch.as_tensor(views[1](img)))


def _network(cfg: dict, spatial_dims: int) -> Encoder:
    # MONAI ResNet with reduced widths: memscan.networks.build_encoder only offers full-width ResNets, too slow for
    # dozens of trainings on a shared 2-core CPU
    net = ResNet("basic", [1, 1, 1, 1], cfg["widths"], spatial_dims=spatial_dims, n_input_channels=1,
                 conv1_t_stride=2, num_classes=cfg["embedding_dim"])
    return Encoder(net)


def train_contrastive(images: np.ndarray, cfg: dict, seed: int = 0) -> Encoder:
    """SimCLR training (two independent views, memscan's NT-Xent) on an in-memory image set.

    A minimal loop instead of ``memscan.training.train_encoder`` (a bundle run on files): the benchmark trains
    dozens of tiny encoders on arrays, where the bundle's start-up and per-epoch validation would dominate.

    Args:
        images: ``[n, 1, *spatial]`` training images in [0, 1].
        cfg: the recipe's ``encoder`` dict.
        seed: seeds the network initialisation and both view transforms.

    Returns:
        The trained encoder in eval mode.
    """
    dims = images.ndim - 2
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _network(cfg, dims)
    loss_fn = NTXentLoss(temperature=cfg["temperature"], gather=False)  # memscan's float32 MONAI ContrastiveLoss
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], weight_decay=1e-5)
    views = view_transform(cfg["augment"], dims, tuple(images.shape[2:]), seed + 1)
    x = torch.as_tensor(images, dtype=torch.float32)
    n, bs = len(x), min(cfg["batch_size"], len(x))
    net.train()
    for _ in range(cfg["steps"]):
        idx = torch.randperm(n, generator=gen)[:bs]
        pairs = [views(x[i]) for i in idx]
        v1 = torch.stack([p[0] for p in pairs]).float()
        v2 = torch.stack([p[1] for p in pairs]).float()
        loss = loss_fn(net(torch.cat([v1, v2])))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def embed(net: Encoder, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Embeddings of an in-memory image batch, in order."""
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)
    return torch.cat([net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def canonical_frame(images: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Crop every image to its foreground box and resize it back: undoes shifts and zooms of the whole object."""
    spatial = images.shape[2:]
    crop = CropForeground(select_fn=lambda x: x > threshold, margin=1, allow_smaller=True)
    resize = Resize(spatial_size=spatial, mode="area")
    out = []
    for im in images:
        box = crop(torch.as_tensor(im))
        out.append(np.asarray(resize(box)) if min(box.shape[1:]) >= 2 else im)
    return np.stack(out).astype(np.float32)


def _training_code() -> str:
    """A digest of the code an encoder's weights depend on (this module, memscan's training, networks and view
    transforms), so stored weights are reused only by the code that trained them (round 23 found the store holding
    weights an earlier version had trained)."""
    import memscan.data.transforms
    import memscan.networks
    import memscan.training

    digest = hashlib.sha256()
    for module in (memscan.data.transforms, memscan.networks, memscan.training):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def _stored_or_trained(key: tuple, images: np.ndarray, cfg: dict, seed: int) -> Encoder:
    """``train_contrastive``, or its state_dict saved by an earlier run under ``$MEMSCAN_DETECTION_ENCODERS`` (a
    folder; unset = always train), keyed by the settings, the images, the seed and :func:`_training_code`. The lever
    studies retrain the same seeded encoders; the weights are identical."""
    folder = os.environ.get("MEMSCAN_DETECTION_ENCODERS")
    if not folder:
        return train_contrastive(images, cfg, seed)
    path = Path(folder) / (hashlib.sha256(repr((key, _training_code())).encode()).hexdigest()[:32] + ".pt")
    if path.is_file():
        net = _network(cfg, images.ndim - 2)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    net = train_contrastive(images, cfg, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
    return net


def fit_detector(recipe: dict, train_images: np.ndarray, seed: int = 0,
                 encoders: dict | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Fit a recipe on the training images; returns ``features(images) -> N×D`` for Pearson matching.

    ``encoders`` (optional) caches trained encoders by (encoder settings, canonical framing, seed, training images),
    so recipes that differ only in scoring share one training.
    """
    prep = canonical_frame if recipe.get("canonical") else (lambda x: x)
    net = None
    if recipe.get("encoder"):
        key = (json.dumps(recipe["encoder"], sort_keys=True), bool(recipe.get("canonical")), seed,
               hashlib.sha256(np.ascontiguousarray(train_images).tobytes()).hexdigest())
        if encoders is not None and key in encoders:
            net = encoders[key]
        else:
            net = _stored_or_trained(key, prep(train_images), recipe["encoder"], seed)
            if encoders is not None:
                encoders[key] = net
    spatial = train_images.shape[2:]

    def blocks(images: np.ndarray) -> dict[str, np.ndarray]:
        images = prep(images)
        out = {}
        for factor, _w in recipe.get("pixel", []):
            size = None if factor == 1 else [max(1, s // factor) for s in spatial]
            out[f"pixel_x{factor}"] = pixel_features(images, size)
        if net is not None:
            out["embedding"] = embed(net, images)
        return out

    weights = {f"pixel_x{f}": w for f, w in recipe.get("pixel", [])}
    if net is not None:
        weights["embedding"] = recipe.get("embedding_weight", 1.0)

    def fused(images: np.ndarray) -> np.ndarray:
        return fuse_features(blocks(images), weights)

    if recipe.get("tta_flip"):
        return lambda images: flip_invariant_features(images, fused, axes=(-1,))
    return fused

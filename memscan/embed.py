"""Embedding extraction: one row per image, in record order, through a MONAI ``SupervisedEvaluator``.

:func:`embed_images` (Python, ``memscan embed``, ``memscan.audit``) and the bundles' ``inference.json`` run the same
evaluator path: a ``monai.data.Dataset`` with the preprocessing transforms, a ``DataLoader``, a
``SupervisedEvaluator`` and :class:`EmbeddingWriter`, under :func:`run_evaluator` (``torch.inference_mode``).
Precision (:func:`resolve_precision`): ``"auto"`` runs float16 autocast on CUDA (with pinned memory) and bfloat16
autocast with channels-last tensors on a CPU that computes bfloat16 natively (AMX / AVX-512 BF16), float32
elsewhere; embeddings are always returned in float32, and the precision is part of the embedding-cache key.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine, Events
from torch import nn

from monai.data import MetaTensor
from monai.inferers import SimpleInferer

from memscan.data.transforms import transform_fingerprint
from memscan.errors import InputError
from memscan.io import save_npy_atomic, write_csv_atomic
from memscan.metrics import resolve_device
from memscan.parallel import intra_op_threads, reuse_freed_memory

__all__ = [
    "PRECISIONS",
    "resolve_precision",
    "EmbeddingInferer",
    "load_encoder",
    "EmbeddingWriter",
    "prepare_images",
    "run_evaluator",
    "embed_images",
    "MirroredFeatureInferer",
    "MirroredFeatures",
    "embed_mirrored",
    "save_embeddings",
    "configured_preprocess",
    "preprocess_batch",
    "file_sha256",
    "network_sha256",
]

logger = logging.getLogger(__name__)

#: accepted ``precision`` values of :func:`embed_images` (``"auto"`` resolves to one of the others)
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def resolve_precision(precision: str | None = "auto", device: str | torch.device | None = "auto") -> str:
    """The arithmetic an embedding run uses on ``device``: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    ``"auto"`` (or None): float16 autocast on CUDA; bfloat16 autocast on a CPU that computes it natively (oneDNN
    with AMX / AVX-512 BF16, where it is several times faster than float32); float32 otherwise (emulated bfloat16 is
    slower than float32). An explicit value is used as given.

    Raises:
        InputError: an unknown precision or device; float16 on a CPU.
    """
    from memscan.training import _native_low_precision  # the oneDNN bfloat16 check the training presets use

    dev = resolve_device(device)
    name = "auto" if precision is None else str(precision).strip().lower()
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)
    if name not in PRECISIONS:
        raise InputError("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if name == "auto":
        if dev.type == "cuda":
            return "float16"
        return "bfloat16" if _native_low_precision("cpu") else "float32"
    if name == "float16" and dev.type != "cuda":
        raise InputError("precision", "float16 needs a CUDA device (use bfloat16 or float32 on a CPU)")
    return name


#: network -> {(device, dtype, input ndim, fuse): (its weights' addresses and versions, inference copy or None)}
_INFERENCE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: names CPU float32 embeddings in channels-last layout in cache keys (oneDNN's kernels for it round differently)
CPU_FLOAT32_LAYOUT = "channels-last-1"


def _channels_last(device: torch.device, dtype: torch.dtype, ndim: int) -> bool:
    """Whether an embedding pass runs channels-last: under low precision (oneDNN's and cuDNN's fast path), and in
    float32 on the CPU (oneDNN, ResNet-18 at 256² 32.4 -> 26.3 ms/img, 3D ResNet-18 99.6 -> 87.5 on an AVX2 CPU)."""
    return ndim in (4, 5) and (dtype != torch.float32 or device.type == "cpu")


class EmbeddingInferer(SimpleInferer):
    """``SimpleInferer`` for embedding: batch norms folded, autocast to ``precision``, channels-last inputs, float32
    outputs.

    An eval-mode network runs as a copy with each batch norm folded into its convolution
    (:func:`memscan.networks.fold_batch_norm`: same function, ~20% faster) and, in bfloat16 on the CPU, each
    convolution fused with the ReLU and residual addition after it (:func:`memscan.networks.fuse_conv_activations`:
    ResNet-18 ~1.45× faster); the network itself is left untouched.

    MONAI engines' ``amp`` flag autocasts on CUDA only; this inferer autocasts on the inputs' device type, so a CPU
    with native bfloat16 gets mixed precision too. Under low precision, and in float32 on the CPU, the network and
    its inputs use the channels-last memory format (oneDNN's and cuDNN's fast path). A batch whose low-precision
    output is not finite is recomputed in float32 (logged), so an overflow never reaches the statistics.

    Args:
        precision: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (see :func:`resolve_precision`; ``"auto"`` is
            resolved on the first batch's device).
        fuse: fuse convolutions with their activations in bfloat16 on the CPU.
    """

    def __init__(self, precision: str = "float32", fuse: bool = True) -> None:
        super().__init__()
        self.precision = precision
        self.fuse = bool(fuse)

    def _inference_network(self, network: Any, device: torch.device, dtype: torch.dtype, ndim: int) -> Any:
        """``network`` with batch norms folded into its convolutions (:func:`memscan.networks.fold_batch_norm`),
        in bfloat16 on the CPU with convolutions fused with their ReLU and residual additions
        (:func:`memscan.networks.fuse_conv_activations`), and channels-last as :func:`_channels_last` says.

        The copy is shared by every inferer while the network lives (an audit embeds several sets with one
        network) and remade whenever its weights change (in place, e.g. an optimizer step, or replaced)."""
        if not isinstance(network, nn.Module) or network.training:
            return network
        weights = tuple((t.data_ptr(), t._version) for t in (*network.parameters(), *network.buffers()))
        key = (str(device), dtype, ndim, self.fuse)
        entries = _INFERENCE_COPIES.get(network, {})
        if key in entries and entries[key][0] == weights:
            return network if entries[key][1] is None else entries[key][1]
        from memscan.networks import fold_batch_norm, fuse_conv_activations

        copy = fold_batch_norm(network)
        if device.type == "cpu" and dtype == torch.bfloat16 and self.fuse:  # float32 measured no faster fused
            copy = fuse_conv_activations(copy, dtype, inplace=copy is not network)
        if _channels_last(device, dtype, ndim):  # a network nothing was folded in is formatted in place
            copy.to(memory_format=torch.channels_last if ndim == 4 else torch.channels_last_3d)
        entries = {k: v for k, v in entries.items() if v[0] == weights}
        entries[key] = (weights, None if copy is network else copy)  # never the network itself: a weak key
        _INFERENCE_COPIES[network] = entries
        return copy

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        precision = resolve_precision(self.precision, inputs.device)
        given = network
        network = self._inference_network(given, inputs.device, getattr(torch, precision), inputs.ndim)
        if _channels_last(inputs.device, getattr(torch, precision), inputs.ndim):
            inputs = inputs.contiguous(memory_format=torch.channels_last if inputs.ndim == 4 else
                                       torch.channels_last_3d)
        if precision == "float32":
            return super().__call__(inputs, network, *args, **kwargs).float()
        # oneDNN gets a few bf16 conv shapes wrong, often finitely (pytorch/pytorch#169688): those run in float32
        from memscan.training import low_precision

        with low_precision(inputs.device.type, getattr(torch, precision)):
            out = super().__call__(inputs, network, *args, **kwargs)
        out = out.float()
        if not bool(torch.isfinite(out).all()):
            logger.warning("%s embedding gave non-finite values: batch recomputed in float32", precision)
            network = self._inference_network(given, inputs.device, torch.float32, inputs.ndim)
            out = super().__call__(inputs.float(), network, *args, **kwargs).float()
        return out


class MirroredFeatureInferer(EmbeddingInferer):
    """Per image of a batch: its embedding, its mirror image's embedding, then for each of ``pixel_sizes`` the
    image's and the mirror image's area-downsampled pixels, then for each of ``plain_pixel_sizes`` the image's alone
    (flattened), as one row (:func:`embed_mirrored`).

    Args:
        precision: as :class:`EmbeddingInferer`.
        mirror_axis: the spatial axis to mirror (0 = the first spatial axis, as ``Flipd(spatial_axis=0)``).
        pixel_sizes: spatial sizes of the downsampled pixels of both images.
        plain_pixel_sizes: spatial sizes of the downsampled pixels of the image alone.
    """

    def __init__(self, precision: str = "float32", mirror_axis: int = 0,
                 pixel_sizes: Sequence[Sequence[int]] = (), plain_pixel_sizes: Sequence[Sequence[int]] = ()) -> None:
        super().__init__(precision)
        self.mirror_axis = int(mirror_axis)
        self.pixel_sizes = [[int(n) for n in size] for size in pixel_sizes]
        self.plain_pixel_sizes = [[int(n) for n in size] for size in plain_pixel_sizes]
        self.widths: list[int] = []  # the parts' column counts, known after the first batch

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        mirrored = torch.flip(inputs, dims=(2 + self.mirror_axis,))
        parts = [super().__call__(inputs, network, *args, **kwargs),
                 super().__call__(mirrored, network, *args, **kwargs)]
        from memscan.scoring import area_pixels

        for size in self.pixel_sizes:
            parts += [area_pixels(x, size).to(parts[0]) for x in (inputs, mirrored)]
        parts += [area_pixels(inputs, size).to(parts[0]) for size in self.plain_pixel_sizes]
        self.widths = [int(p.shape[1]) for p in parts]
        return torch.cat(parts, dim=1)


def load_encoder(
    checkpoint: str | Path,
    *,
    spatial_dims: int | None = None,
    arch: str | None = None,
    embedding_dim: int | None = None,
    image_size: int | Sequence[int] | None = None,
) -> tuple[nn.Module, Any]:
    """Load a trained encoder and the preprocessing it was trained with.

    Settings come from, in order of priority: the arguments, ``encoder.json`` beside the checkpoint (written by
    :func:`memscan.training.train_encoder`), the checkpoint itself (dimensionality, architecture and embedding size
    are recognised from the weights), and the ``paper`` preset's preprocessing (the bundles' defaults).

    Args:
        checkpoint: plain state_dict file (``model.pt``).
        spatial_dims, arch, embedding_dim, image_size: explicit settings.

    Returns:
        ``(network, preprocess_config)``: the encoder in eval mode on the CPU and a ``memscan.data.PreprocessConfig``.

    Raises:
        InputError: unreadable checkpoint or settings that do not fit it.
    """
    from memscan.data import PreprocessConfig
    from memscan.networks import build_encoder, infer_encoder, load_encoder_checkpoint, read_state_dict
    from memscan.training import ENCODER_KEYS, as_spatial_size, preset, read_encoder_settings

    path = Path(checkpoint)
    settings = {k: v for k, v in read_encoder_settings(path).items() if k in (*ENCODER_KEYS, "spatial_dims")}
    if not {"spatial_dims", "arch", "embedding_dim"} <= settings.keys():
        settings = {**infer_encoder(read_state_dict(path), path), **settings}
    explicit = {"spatial_dims": spatial_dims, "arch": arch, "embedding_dim": embedding_dim, "image_size": image_size}
    settings.update({k: v for k, v in explicit.items() if v is not None})
    dims = int(settings["spatial_dims"])
    defaults = preset("paper", dims)
    for key in ("image_size", "crop_pad_size", "resize"):
        settings.setdefault(key, defaults[key])
    network = build_encoder(dims, settings["arch"], int(settings["embedding_dim"]), int(settings.get("in_channels", 1)))
    load_encoder_checkpoint(network, path)
    cfg = PreprocessConfig(
        spatial_dims=dims,
        spatial_size=as_spatial_size(settings["image_size"], dims),
        crop_pad_size=settings["crop_pad_size"],
        resize=bool(settings["resize"]),
        intensity=settings.get("intensity", "minmax"),
    )
    return network.eval(), cfg


def prepare_images(
    batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """``prepare_batch`` for the embedding evaluator: the ``"image"`` tensor only (records carry string fields)."""
    image = torch.as_tensor(batchdata["image"])
    if type(image) is not torch.Tensor:  # MetaTensor: plain tensor so the network does not pay for metadata
        image = image.as_subclass(torch.Tensor)
    return image.to(device=device, non_blocking=non_blocking, **kwargs), None


class EmbeddingWriter:
    """Ignite handler collecting the evaluator's predictions in order; optionally writes them on completion.

    Args:
        records: the records being embedded (their ``"image"`` paths go to the ``.files.csv`` list).
        output_file: ``.npy`` to write (atomically) when the run completes, with ``<stem>.files.csv`` beside it;
            None keeps the embeddings in memory only (:attr:`embeddings`).
    """

    def __init__(self, records: Sequence[Mapping[str, Any]] | None = None, output_file: str | Path | None = None):
        self.records = list(records) if records is not None else None
        self.output_file = None if output_file is None else Path(output_file)
        self._chunks: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._chunks = []

    def _collect(self, engine: Engine) -> None:
        pred = engine.state.output["pred"]
        self._chunks.append(torch.as_tensor(pred).detach().float().cpu().reshape(pred.shape[0], -1))

    @property
    def embeddings(self) -> np.ndarray:
        """The collected embeddings, ``[n, d]`` float32."""
        if not self._chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.cat(self._chunks).numpy().astype(np.float32, copy=False)

    def _complete(self, engine: Engine) -> None:
        if self.output_file is not None:
            files = [str(r["image"]) for r in self.records] if self.records is not None else None
            save_embeddings(self.embeddings, self.output_file, files=files)
            logger.info("wrote %s embeddings to %s", len(self.embeddings), self.output_file)


def run_evaluator(evaluator: Engine) -> Any:
    """Run an embedding evaluator without autograd bookkeeping (``torch.inference_mode``), its batches' large
    activations reusing freed heap memory (:func:`memscan.parallel.reuse_freed_memory`)."""
    with torch.inference_mode(), reuse_freed_memory():
        evaluator.run()
    return evaluator


@dataclass
class MirroredFeatures:
    """What :func:`embed_mirrored` returns: float32 arrays with one row per record.

    Attributes:
        embedding: the images' embeddings ``[N, D]``.
        mirrored: the mirror images' embeddings ``[N, D]``.
        pixels: per requested pixel size, ``(image pixels, mirror image pixels)``, each ``[N, C·prod(size)]``.
        plain_pixels: per requested plain pixel size, the image's pixels ``[N, C·prod(size)]``.
    """

    embedding: np.ndarray
    mirrored: np.ndarray
    pixels: list[tuple[np.ndarray, np.ndarray]]
    plain_pixels: list[np.ndarray] = field(default_factory=list)


def embed_mirrored(
    network: nn.Module,
    records: Sequence[Mapping[str, Any]],
    preprocess: Callable[[Any], Any] | Any,
    *,
    mirror_axis: int = 0,
    pixel_sizes: Sequence[Sequence[int]] = (),
    plain_pixel_sizes: Sequence[Sequence[int]] = (),
    batch_size: int = 16,
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
    checkpoint_sha256: str | None = None,
    num_workers: int | None = None,
    precision: str = "auto",
    progress: bool = False,
) -> MirroredFeatures:
    """Embeddings of each image and of its mirror image, and both images' downsampled pixels, from one decoding and
    preprocessing of every file (the audit's fused score needs all four; separate passes decoded each file three
    times).

    The two embeddings equal ``embed_images(preprocess)`` and ``embed_images(Compose([preprocess,
    Flipd(spatial_axis=mirror_axis)]))`` and share their cache entries; the pixels equal
    :func:`memscan.scoring.pixel_features` of the preprocessed images. When every embedding is cached, only the
    pixels are computed (no network pass).

    Args:
        network, records, preprocess, batch_size, device, cache_dir, checkpoint_sha256, num_workers, precision,
            progress: as :func:`embed_images`.
        mirror_axis: the spatial axis mirrored.
        pixel_sizes: spatial sizes of the downsampled pixels returned for the image and its mirror image.
        plain_pixel_sizes: spatial sizes of the downsampled pixels returned for the image alone (no mirror pixels are
            computed or held for these).

    Returns:
        The :class:`MirroredFeatures`.
    """
    from monai.transforms import Compose, Flipd

    from memscan.scoring import pixel_features

    records, preprocess, dev, resolved, workers = _setup(records, preprocess, batch_size, device, precision, None,
                                                         num_workers)
    flipped = Compose([getattr(preprocess, "compose", preprocess), Flipd(keys="image", spatial_axis=mirror_axis)])
    cache = Path(cache_dir) if cache_dir is not None else None
    keys = _cache_keys(records, network, [preprocess, flipped], dev, resolved, checkpoint_sha256) \
        if cache is not None else [[], []]
    cached = [_load_cached(cache, k) for k in keys]
    sizes = [[int(n) for n in size] for size in pixel_sizes]
    plain_sizes = [[int(n) for n in size] for size in plain_pixel_sizes]
    n = len(records)
    if cache is not None and n and all(len(c) == n for c in cached):
        pixels: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in sizes]
        plain_only: list[list[np.ndarray]] = [[] for _ in plain_sizes]
        for start in range(0, n, int(batch_size)):  # batched: a large set never sits in memory at full size
            batch = preprocess_batch(preprocess, records[start:start + int(batch_size)])
            for (plain, mirror), size in zip(pixels, sizes):
                plain.append(pixel_features(batch, size))
                mirror.append(pixel_features(np.flip(batch, axis=2 + mirror_axis), size))
            for plain, size in zip(plain_only, plain_sizes):
                plain.append(pixel_features(batch, size))
        return MirroredFeatures(np.stack([cached[0][i] for i in range(n)]).astype(np.float32),
                                np.stack([cached[1][i] for i in range(n)]).astype(np.float32),
                                [(np.concatenate(plain), np.concatenate(mirror)) for plain, mirror in pixels],
                                [np.concatenate(plain) for plain in plain_only])
    if n:
        logger.info("embedding %d image(s) and their mirror images on %s in %s", n, dev, resolved)
    inferer = MirroredFeatureInferer(resolved, mirror_axis, sizes, plain_sizes)
    rows = _evaluate(network, records, preprocess, inferer, batch_size, dev, workers, progress) if n else \
        np.zeros((0, 0), np.float32)
    bounds = np.cumsum([0, *inferer.widths]) if n else np.zeros(2 + 2 * len(sizes) + len(plain_sizes) + 1, int)
    parts = [rows[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    embedding, mirrored = parts[0], parts[1]
    for part, key_list, done in zip((embedding, mirrored), keys, cached):
        if cache is not None:
            for i in range(n):
                if i not in done:
                    save_npy_atomic(cache / f"{key_list[i]}.npy", part[i])
    pixels_out = [(parts[2 + 2 * j], parts[3 + 2 * j]) for j in range(len(sizes))]
    return MirroredFeatures(embedding, mirrored, pixels_out, parts[2 + 2 * len(sizes):])


def save_embeddings(array: np.ndarray, path: str | Path, files: Sequence[str] | None = None) -> Path:
    """Write ``array`` to ``path`` (``.npy``) and, if given, ``files`` to ``<path minus .npy>.files.csv``.

    Both are written to a temporary file first and moved into place (``os.replace``).

    Raises:
        InputError: ``files`` does not have one entry per row.
    """
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    if files is not None and len(files) != len(array):
        raise InputError(path, f"{len(array)} embeddings but {len(files)} file names")
    save_npy_atomic(path, array)
    if files is not None:
        listing = path.with_name(path.name[: -len(".npy")] + ".files.csv")
        write_csv_atomic(pd.DataFrame({"index": range(len(files)), "image": [str(f) for f in files]}), listing)
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def network_sha256(network: nn.Module) -> str:
    """SHA-256 of a network's parameters and buffers (identifies the weights when no checkpoint hash is given)."""
    digest = hashlib.sha256()
    for key, value in network.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _meta_split(transform: Callable[[Any], Any]) -> tuple[Callable[[Any], Any], Callable[[Any], Any] | None]:
    """Split a ``Compose`` after its last transform that reads image metadata (loading, channel, orientation,
    spacing); the rest can run on plain tensors. Other callables are not split."""
    from monai.transforms import (Compose, EnsureChannelFirst, EnsureChannelFirstd, LoadImage, LoadImaged,
                                  Orientation, Orientationd, Spacing, Spacingd)

    from memscan.data.transforms import EnsureSpatialDimsd

    if not isinstance(transform, Compose):
        return transform, None
    chain = list(transform.flatten().transforms)
    needs_meta = (LoadImage, LoadImaged, EnsureChannelFirst, EnsureChannelFirstd, Orientation, Orientationd,
                  Spacing, Spacingd, EnsureSpatialDimsd)
    last = max((i for i, t in enumerate(chain) if isinstance(t, needs_meta)), default=-1)
    if last + 1 >= len(chain):
        return transform, None
    return Compose(chain[: last + 1]), Compose(chain[last + 1 :])


class _LoaderTransform:
    """The embedding loader's per-image work: preprocessing (on one intra-op thread when asked; after the
    metadata-reading steps on plain tensors, MONAI's ``track_meta`` off), then the image as a plain tensor."""

    def __init__(self, transform: Callable[[Any], Any], single_thread: bool) -> None:
        self.transform, self.single_thread = transform, single_thread
        self.head, self.tail = _meta_split(transform)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        from monai.data import get_track_meta, set_track_meta

        # per-image ops are too small to split: 2+ threads only wait on each other (much worse on busy cores)
        with intra_op_threads(1 if self.single_thread else torch.get_num_threads()):
            out = self.head(data)
            if self.tail is not None:
                out = dict(out)
                if isinstance(out.get("image"), MetaTensor):
                    out["image"] = out["image"].as_tensor()
                tracking = get_track_meta()
                set_track_meta(False)  # process-wide flag; the loader runs one image at a time per process
                try:
                    out = self.tail(out)
                finally:
                    set_track_meta(tracking)
        image = out["image"]
        return {"image": image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)}


def preprocess_batch(preprocess: Callable[[Any], Any], records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The preprocessed images of ``records``, stacked (``[N, C, *spatial]`` float32), as the embedding loader makes
    them: on one intra-op thread, plain tensors after the metadata-reading steps. One image at a time (MONAI's
    metadata switch is process-wide)."""
    step = _LoaderTransform(preprocess, single_thread=True)
    return np.stack([step({"image": r["image"]})["image"].detach().cpu().numpy().astype(np.float32, copy=False)
                     for r in records])


class _PrefetchLoader:
    """A loader iterated in a background thread (MONAI ``ThreadBuffer``) whose errors reach the consumer.

    Written because MONAI's ``ThreadDataLoader`` drops an exception raised in its thread (a corrupt file) and just
    ends the epoch early, and ignite then restarts the iterator: batches would silently repeat. Here the exception
    is re-raised in the consuming thread, exactly as a loader without the thread raises it.
    """

    def __init__(self, loader: Any, buffer_size: int = 2) -> None:
        self.loader, self.buffer_size = loader, buffer_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        from monai.data import ThreadBuffer

        def guarded() -> Iterator[tuple[Any, BaseException | None]]:
            try:
                for batch in self.loader:
                    yield batch, None
            except Exception as err:  # noqa: BLE001 — handed over to the consuming thread, which raises it
                yield None, err

        for batch, err in ThreadBuffer(guarded(), buffer_size=self.buffer_size):
            if err is not None:
                raise err
            yield batch


@functools.lru_cache(maxsize=65536)
def _content_sha256(path: str, size: int, mtime_ns: int) -> str:
    """File content hash, remembered per (path, size, mtime) so one process hashes a file once."""
    return file_sha256(path)


def _cache_key(record: Mapping[str, Any], weights: str, preprocess: str, precision: str) -> str:
    """Embedding-cache key: the file's content hash, the weights, the preprocessing settings and the precision.

    Keyed by content (not path) so a resumed audit reuses embeddings after the data folder moves, and an edited
    file is embedded again.
    """
    path = Path(str(record["image"]))
    try:
        if path.is_dir():  # a DICOM series folder: hash its member files' names and contents
            parts = sorted(p for p in path.rglob("*") if p.is_file())
            content = hashlib.sha256("".join(
                f"{p.relative_to(path)}:{_content_sha256(str(p), p.stat().st_size, p.stat().st_mtime_ns)}"
                for p in parts).encode()).hexdigest()
        else:
            stat = path.stat()
            content = _content_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:
        content = f"missing:{path.resolve()}"
    text = f"{weights}|{content}|{preprocess}|{precision}"
    return hashlib.sha256(text.encode()).hexdigest()


def configured_preprocess(cfg: Any) -> Callable[[Any], Any]:
    """The data layer's preprocessing for ``cfg`` (``preprocess_transforms``; its embedding-cache key is
    :func:`memscan.data.transforms.transform_fingerprint` of the chain, whichever way it was built)."""
    from memscan.data import preprocess_transforms

    return preprocess_transforms(cfg)


def _setup(records: Sequence[Mapping[str, Any]], preprocess: Any, batch_size: int, device: str | torch.device,
           precision: str, amp: bool | None, num_workers: int | None,
           ) -> tuple[list[dict[str, Any]], Callable[[Any], Any], torch.device, str, int]:
    """Checked records, the preprocessing callable, the device, the resolved precision and the loader workers."""
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise InputError("batch_size", f"must be >= 1, got {batch_size}")
    records = [dict(r) for r in records]
    for row, record in enumerate(records):
        if "image" not in record:
            raise InputError("records", "record has no 'image' entry", row=row)
    if not callable(preprocess) and hasattr(preprocess, "spatial_dims"):  # a PreprocessConfig
        preprocess = configured_preprocess(preprocess)
    dev = resolve_device(device)
    resolved = resolve_precision("float32" if amp is False else precision, dev)
    workers = (2 if dev.type == "cuda" else 0) if num_workers is None else int(num_workers)
    if workers < 0:
        raise InputError("num_workers", f"must be >= 0, got {num_workers}")
    return records, preprocess, dev, resolved, workers


def _cache_keys(records: Sequence[Mapping[str, Any]], network: nn.Module, preprocesses: Sequence[Any],
                dev: torch.device, resolved: str, checkpoint_sha256: str | None) -> list[list[str]]:
    """Embedding-cache keys of ``records`` (:func:`_cache_key`) for this network and precision, one list per
    preprocessing (the weights are hashed once)."""
    from memscan.networks import FusedConv, fusion_available
    from memscan.training import Float32UnsafeConvs

    weights = checkpoint_sha256 or network_sha256(network)
    # CPU bfloat16 results depend on which convolutions the guard runs in float32 and on the fused kernels
    key_precision = f"{resolved}+{Float32UnsafeConvs.VERSION}" if resolved == "bfloat16" else resolved
    if resolved == "bfloat16" and dev.type == "cpu" and fusion_available():
        key_precision += f"+{FusedConv.VERSION}"
    if resolved == "float32" and dev.type == "cpu":
        key_precision += f"+{CPU_FLOAT32_LAYOUT}"
    descriptions = [transform_fingerprint(tf) for tf in preprocesses]
    return [[_cache_key(r, weights, description, key_precision) for r in records] for description in descriptions]


def _load_cached(cache: Path | None, keys: Sequence[str]) -> dict[int, np.ndarray]:
    """The cached rows by record index (an unreadable entry counts as missing)."""
    cached: dict[int, np.ndarray] = {}
    if cache is None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(keys):
        f = cache / f"{key}.npy"
        if f.is_file():
            try:
                cached[i] = np.load(f, allow_pickle=False)
            except (OSError, ValueError):
                pass  # unreadable cache entry: recompute it
    return cached


def _evaluate(network: nn.Module, records: Sequence[Mapping[str, Any]], preprocess: Callable[[Any], Any],
              inferer: EmbeddingInferer, batch_size: int, dev: torch.device, workers: int, progress: bool,
              ) -> np.ndarray:
    """One ``SupervisedEvaluator`` pass over ``records``: the inferer's output row per record, in order."""
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator

    network = network.to(dev).eval()
    dataset = Dataset(list(records), transform=_LoaderTransform(preprocess, single_thread=workers == 0))
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    if workers == 0:  # a background thread preprocesses the next batches while the network runs on this one
        # settle this thread's intra-op count now: a thread that has not run a parallel op yet takes the
        # process-wide count at its first one, which the loader thread lowers to 1 while it preprocesses
        torch.get_num_threads()
        loader = _PrefetchLoader(loader)
    writer = EmbeddingWriter()
    handlers: list[Any] = [writer]
    if progress:
        from ignite.handlers import ProgressBar

        handlers.append(ProgressBar(persist=True))
    evaluator = SupervisedEvaluator(
        device=dev,
        val_data_loader=loader,
        network=network,
        inferer=inferer,
        prepare_batch=prepare_images,
        non_blocking=dev.type == "cuda",
        amp=False,  # the inferer autocasts (CPU bfloat16 as well as CUDA)
        decollate=False,
        val_handlers=handlers,
    )
    run_evaluator(evaluator)
    rows = writer.embeddings
    if len(rows) != len(records):
        raise InputError("records", f"expected {len(records)} embeddings, got {len(rows)}")
    return rows


def embed_images(
    network: nn.Module,
    records: Sequence[Mapping[str, Any]],
    preprocess: Any,
    *,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
    checkpoint_sha256: str | None = None,
    num_workers: int | None = None,
    amp: bool | None = None,
    precision: str = "auto",
    progress: bool = False,
) -> np.ndarray:
    """Embed images with an encoder: one float32 row per record, in record order.

    Args:
        network: the encoder (``[B, C, *spatial]`` → ``[B, D]``); put in eval mode and moved to ``device`` (under
            low precision, and in float32 on the CPU, also to the channels-last memory format), in place.
        records: ``{"image": path, ...}`` dicts (``ImageSet.records``).
        preprocess: deterministic transforms on key ``"image"`` (``memscan.data.preprocess_transforms``), or the
            ``PreprocessConfig`` to build them from.
        batch_size: images per forward pass.
        device: ``"auto"`` (GPU when available), ``"cpu"``, ``"cuda:0"``, ...
        cache_dir: folder for per-image embedding caches; an image is re-embedded only when its file, the weights,
            the preprocessing (:func:`memscan.data.transforms.transform_fingerprint`) or the precision change.
        checkpoint_sha256: identifies the weights for the cache (computed from the network when omitted).
        num_workers: data-loading processes that decode and preprocess while the network runs (default: 2 on GPU,
            0 on CPU, where a background thread (MONAI ``ThreadBuffer``) preprocesses the next batches, each image
            on one intra-op thread, while the network runs).
        amp: legacy switch: False means ``precision="float32"``; True or None leave ``precision`` as given.
        precision: ``"auto"`` (default), ``"float32"``, ``"bfloat16"`` or ``"float16"``; see
            :func:`resolve_precision`.
        progress: show a progress bar.

    Returns:
        ``np.ndarray`` of shape ``[len(records), D]``.

    Raises:
        InputError: bad device, precision or batch size; a record without ``"image"``.
    """
    records, preprocess, dev, resolved, workers = _setup(records, preprocess, batch_size, device, precision, amp,
                                                         num_workers)
    cache = Path(cache_dir) if cache_dir is not None else None
    keys = _cache_keys(records, network, [preprocess], dev, resolved, checkpoint_sha256)[0] if cache is not None \
        else []
    cached = _load_cached(cache, keys)
    todo = [i for i in range(len(records)) if i not in cached]

    fresh = np.zeros((0, 0), dtype=np.float32)
    if todo:
        logger.info("embedding %d image(s) on %s in %s (%d cached)", len(todo), dev, resolved, len(cached))
        fresh = _evaluate(network, [records[i] for i in todo], preprocess, EmbeddingInferer(resolved), batch_size,
                          dev, workers, progress)
        if cache is not None:
            for row, i in enumerate(todo):
                save_npy_atomic(cache / f"{keys[i]}.npy", fresh[row])
    if not records:
        return np.zeros((0, 0), dtype=np.float32)
    dim = fresh.shape[1] if len(fresh) else next(iter(cached.values())).shape[-1]
    out = np.empty((len(records), dim), dtype=np.float32)
    for row, i in enumerate(todo):
        out[i] = fresh[row]
    for i, value in cached.items():
        out[i] = value
    return out

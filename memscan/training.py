"""Self-supervised (SimCLR / NT-Xent) training of the copy-detection encoder with MONAI engines.

The pieces here are what the bundles' ``train.json`` / ``multi_gpu_train.json`` reference, so the bundle, the
``memscan train`` command and Python users share one implementation:

- :class:`ContrastivePrepareBatch` feeds ``cat([view1, view2])`` to the network in one forward pass;
- :class:`NTXentLoss` wraps :class:`monai.losses.ContrastiveLoss` in float32 with a differentiable all-gather so
  every rank's negatives come from the global batch;
- :func:`collapse_metrics` / :class:`ContrastiveMetric` report positive, negative and nearest-negative similarity;
- :class:`RNGState`, :class:`EngineState`, :class:`KeyMetricState`, :func:`latest_checkpoint` make a killed run
  resume from its last epoch with ``weights_only=True`` checkpoints;
- :func:`run_trainer` is the bundles' run step;
- :data:`PRESETS` and :func:`train_encoder` run the bundle config through :class:`monai.bundle.ConfigWorkflow`.

Method: Dar et al., "Unconditional latent diffusion models memorize patient imaging data" (2025); loss from
Chen et al., "A simple framework for contrastive learning of visual representations" (ICML 2020).
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.data.utils import set_rnd
from monai.engines import PrepareBatch
from monai.inferers import SimpleInferer
from monai.losses import ContrastiveLoss
from monai.utils import optional_import
from torch import nn
from torch.overrides import TorchFunctionMode

from memscan.errors import InputError, MemscanError
from memscan.parallel import reuse_freed_memory

__all__ = [
    "PRESETS",
    "BUNDLES",
    "preset",
    "as_spatial_size",
    "ContrastivePrepareBatch",
    "AutocastInferer",
    "bf16_conv_is_unsafe",
    "Float32UnsafeConvs",
    "low_precision",
    "gather_with_grad",
    "NTXentLoss",
    "collapse_metrics",
    "ContrastiveMetric",
    "lower_is_better",
    "output_loss",
    "RNGState",
    "EngineState",
    "KeyMetricState",
    "ReseedTransforms",
    "latest_checkpoint",
    "run_trainer",
    "read_encoder_settings",
    "bundle_dir",
    "bundle_root",
    "split_source",
    "contrastive_dataset",
    "check_batch_size",
    "fit_batch_size",
    "is_main_process",
    "writes_tensorboard",
    "init_distributed",
    "shutdown_distributed",
    "distributed_device",
    "to_device",
    "wrap_ddp",
    "train_encoder",
    "ENCODER_KEYS",
]

logger = logging.getLogger(__name__)

#: bundle name per spatial dimensionality
BUNDLES: dict[int, str] = {2: "memscan_cxr_2d", 3: "memscan_knee_3d"}

#: Training presets, keyed by name then spatial dims. Keys are the bundles' top-level config ids.
#: ``paper`` reproduces Dar et al. exactly; ``default`` is memscan's own (small, CPU-friendly for now).
PRESETS: dict[str, dict[int, dict[str, Any]]] = {
    "paper": {
        2: {
            "arch": "resnet50",
            "embedding_dim": 128,
            "image_size": [512, 512],
            "temperature": 0.07,
            "batch_size": 64,
            "learning_rate": 1e-4,
            "min_learning_rate": 5e-5,
            "max_epochs": 200,
            "augment": "paper",
            "crop_pad_size": 1024,
            "resize": True,
        },
        3: {
            "arch": "resnet50",
            "embedding_dim": 32,
            "image_size": [32, 256, 256],
            "temperature": 0.07,
            "batch_size": 10,
            "learning_rate": 1e-4,
            "min_learning_rate": 1e-4,  # the paper states a constant Adam 1e-4 for knee MRI
            "max_epochs": 200,
            "augment": "paper",
            "crop_pad_size": None,
            "resize": False,
        },
    },
    "default": {
        2: {
            "arch": "resnet18",
            "embedding_dim": 128,
            "image_size": [256, 256],
            "temperature": 0.07,  # benchmarks/detection: the winning recipe's NT-Xent temperature
            "batch_size": 32,
            "learning_rate": 3e-4,
            "min_learning_rate": 3e-5,
            "max_epochs": 100,
            "augment": "default",  # generator-artefact views (memscan.data.transforms.AUGMENT_PRESETS["default"])
            "crop_pad_size": None,
            "resize": True,
            "cpu_bf16": True,  # bfloat16 autocast where the CPU has it natively (5.8x vs the seed loop, see benchmarks)
        },
        3: {
            "arch": "resnet18",
            "embedding_dim": 32,
            "image_size": [32, 128, 128],
            "temperature": 0.07,
            "batch_size": 8,
            "learning_rate": 3e-4,
            "min_learning_rate": 3e-5,
            "max_epochs": 100,
            "augment": "default",
            "crop_pad_size": None,
            "resize": True,
            "cpu_bf16": True,  # 1.9x per step at 32x128x128 (docs/benchmarks/cpu_bf16.txt); see Float32UnsafeConvs
        },
    },
}


def preset(name: str, spatial_dims: int) -> dict[str, Any]:
    """Return a copy of a training preset (bundle config overrides).

    Raises:
        InputError: unknown preset name or dimensionality.
    """
    if name not in PRESETS:
        raise InputError("preset", f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    if spatial_dims not in PRESETS[name]:
        raise InputError("spatial_dims", f"expected 2 or 3, got {spatial_dims!r}")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS[name][spatial_dims].items()}


def as_spatial_size(size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """Expand ``512`` to ``(512, 512)`` (or check a per-axis size has ``spatial_dims`` entries).

    Raises:
        InputError: wrong number of axes or a non-positive size.
    """
    sizes = (int(size),) * spatial_dims if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    if len(sizes) != spatial_dims or min(sizes) < 1:
        raise InputError("image_size", f"expected {spatial_dims} positive sizes, got {size!r}")
    return sizes


# --------------------------------------------------------------------------------------------------------- batches
def _plain(x: Any) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of a tensor / MetaTensor / array (no copy for tensors)."""
    x = torch.as_tensor(x)
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


class ContrastivePrepareBatch(PrepareBatch):
    """Stack the two augmented views of each image into one batch: ``(cat([view1, view2]), None)``.

    The network sees both views in a single forward pass (so batch-norm statistics cover both), and
    :class:`NTXentLoss` splits the output back into the two halves.

    Args:
        view_keys: the two dictionary keys holding the views (from ``memscan.data.view_transforms``).
        channels_last: convert the batch to channels-last memory format (faster convolutions with AMP on GPU).
    """

    def __init__(self, view_keys: Sequence[str] = ("view1", "view2"), channels_last: bool = False) -> None:
        if len(view_keys) != 2:
            raise InputError("view_keys", f"expected two keys, got {list(view_keys)}")
        self.view_keys = tuple(view_keys)
        self.channels_last = bool(channels_last)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        # plain tensors: a MetaTensor input would route every network op through MetaTensor.__torch_function__
        views = [_plain(batchdata[k]) for k in self.view_keys]
        x = torch.cat(views, dim=0).to(device=device, non_blocking=non_blocking, **kwargs)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
        return x, None


def _native_low_precision(device_type: str) -> bool:
    """True when the device computes bfloat16 natively (CPU: oneDNN with AVX-512 BF16 / AMX); emulated bf16 is slow."""
    if device_type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _per_axis(value: Any, n: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * n


def bf16_conv_is_unsafe(
    input_shape: Sequence[int],
    kernel_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> bool:
    """True for the convolution shapes whose oneDNN bfloat16 CPU kernels give wrong results (garbage, Inf or NaN).

    Two kernel bugs, measured on a grid (2D/3D; 1-512 channels; kernels 1/3/5/7; strides 1-3; axes of 1-16):

    - the innermost output axis has size 1 under a stride > 1 (pytorch/pytorch#169688): ``conv3d`` at any channel
      count, ``conv2d`` with many channels — e.g. a ResNet on 32x32x8 volumes, whose last axis shrinks to 1;
    - ``conv3d`` with a first spatial axis of size 1 (kernel > 1 along it) and a channel count that is not a multiple
      of 16 (oneDNN's channel blocking tail).

    The wrong values depend on what the heap held, so a run can be right, finite but wrong, or NaN depending on what
    ran earlier in the process. No wrong result on the grid falls outside these two rules.

    Args:
        input_shape: ``[B, C, *spatial]``.
        kernel_size: the kernel's spatial size (``weight.shape[2:]``).
        stride, padding, dilation: as passed to ``torch.nn.functional.conv{2,3}d``.
    """
    spatial = tuple(int(s) for s in input_shape[2:])
    n = len(spatial)
    kernel = _per_axis(kernel_size, n)
    if n == 0 or max(kernel) <= 1:
        return False
    if n == 3 and spatial[0] == 1 and kernel[0] > 1 and int(input_shape[1]) % 16:
        return True
    strides, dilations = _per_axis(stride, n), _per_axis(dilation, n)
    if strides[-1] <= 1:
        return False
    if isinstance(padding, str):
        pad = 0 if padding == "valid" else (dilations[-1] * (kernel[-1] - 1)) // 2
    else:
        pad = _per_axis(padding, n)[-1]
    out_last = (spatial[-1] + 2 * pad - dilations[-1] * (kernel[-1] - 1) - 1) // strides[-1] + 1
    return out_last <= 1


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


class Float32UnsafeConvs(TorchFunctionMode):
    """Inside bfloat16 CPU autocast, run the convolutions of :func:`bf16_conv_is_unsafe` in float32.

    ``VERSION`` names the rule set: embedding caches key bfloat16 results on it, so a changed rule re-embeds.
    A ``TorchFunctionMode`` so the network, its state_dict and checkpoints stay untouched; every other convolution
    keeps oneDNN's fast bf16 kernels. Written here because neither torch's autocast policy nor MONAI can choose a
    precision per input shape.
    """

    VERSION = "onednn-bf16-conv-guard-2"

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.conv3d or func is torch.conv2d:
            call = dict(_CONV_DEFAULTS)
            call.update(zip(_CONV_ARGS, args))
            call.update(kwargs)
            x, w = call["input"], call["weight"]
            if bf16_conv_is_unsafe(x.shape, w.shape[2:], call["stride"], call["padding"], call["dilation"]):
                bias = call["bias"]
                with torch.autocast(x.device.type, enabled=False):
                    return func(x.float(), w.float(), None if bias is None else bias.float(), call["stride"],
                                call["padding"], call["dilation"], call["groups"])
        return func(*args, **kwargs)


@contextmanager
def low_precision(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """``torch.autocast(device_type, dtype)``, on the CPU with :class:`Float32UnsafeConvs` inside: the one way
    memscan enters mixed precision (training and embedding inferers)."""
    with torch.autocast(device_type, dtype=dtype), (Float32UnsafeConvs() if device_type == "cpu" else nullcontext()):
        yield


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` under ``torch.autocast`` for one device type (default: bfloat16 on the CPU).

    MONAI engines' ``amp`` flag autocasts on CUDA only; this gives CPUs with bfloat16 units (AMX, AVX-512 BF16)
    the same mixed precision. Inputs on another device type, or a CPU without native bfloat16, run unchanged, so GPU
    runs keep using ``amp``. The loss is computed outside, in float32 (:class:`NTXentLoss`). On the CPU, the few
    convolutions oneDNN computes wrongly in bfloat16 run in float32 (:class:`Float32UnsafeConvs`).

    Args:
        enabled: switch autocast on.
        device_type: the device type to autocast on (``"cpu"``).
        dtype: ``"bfloat16"`` or ``"float16"``.
    """

    def __init__(self, enabled: bool = True, device_type: str = "cpu", dtype: str = "bfloat16") -> None:
        super().__init__()
        self.enabled, self.device_type, self.dtype = bool(enabled), device_type, getattr(torch, dtype)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or inputs.device.type != self.device_type or not _native_low_precision(self.device_type):
            return super().__call__(inputs, network, *args, **kwargs)
        with low_precision(self.device_type, self.dtype):
            out = super().__call__(inputs, network, *args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) else out


# ------------------------------------------------------------------------------------------------------------ loss
class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradients of all ranks and returns this rank's slice.

    Written by hand because ``torch.distributed.nn.all_gather`` needs reduce-scatter / all-to-all in its backward,
    which the gloo backend (CPU, CI) lacks; all-reduce works everywhere.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping gradients (identity when not distributed).

    Every rank must pass the same shape (the training loader drops its last incomplete batch).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


class NTXentLoss(nn.Module):
    """NT-Xent over a batch ``cat([z1, z2])``, computed by :class:`monai.losses.ContrastiveLoss` in float32.

    Autocast is switched off for the loss: ``ContrastiveLoss`` exponentiates ``sim / T`` without log-sum-exp, which
    overflows in float16 for ``T < 0.09``. Under ``torch.distributed`` the embeddings of all ranks are gathered
    (with gradient) first, so negatives come from the global batch. Every rank then computes the same global loss;
    DistributedDataParallel's gradient averaging turns the summed gathered gradients into the exact gradient.

    Args:
        temperature: softmax temperature (0.07 in Dar et al.).
        gather: gather embeddings across ranks when distributed.
    """

    def __init__(self, temperature: float = 0.07, gather: bool = True) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise InputError("temperature", f"must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.gather = gather
        self.loss = ContrastiveLoss(temperature=self.temperature)

    def forward(self, pred: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Args: pred: ``[2B, D]`` embeddings, views 1 then views 2; target: ignored (kept for MONAI engines)."""
        z1, z2 = _split_views(pred)
        autocast_off = torch.autocast(pred.device.type, enabled=False) if pred.device.type in ("cuda", "cpu") else nullcontext()
        with autocast_off:
            z1, z2 = z1.float(), z2.float()
            if self.gather:
                z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
            return self.loss(z1, z2)


def _split_views(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.as_tensor(pred)
    if pred.ndim != 2 or pred.shape[0] % 2:
        raise ValueError(f"expected embeddings [2B, D] (two views stacked), got shape {tuple(pred.shape)}")
    z1, z2 = pred.chunk(2, dim=0)
    return z1, z2


@torch.no_grad()
def collapse_metrics(z1: torch.Tensor, z2: torch.Tensor) -> dict[str, float]:
    """Collapse diagnostics of a batch of paired embeddings (cosine similarities).

    ``positive_similarity`` (two views of one image), ``negative_similarity`` (all pairs of different images) and
    ``nearest_negative_similarity`` (each embedding's most similar other image, the one that decides whether a copy
    is separable). A collapsed encoder has all three near 1.

    Args:
        z1: ``[B, D]`` embeddings of the first views.
        z2: ``[B, D]`` embeddings of the second views (row ``i`` pairs with row ``i`` of ``z1``).

    Returns:
        dict with the three means as floats.
    """
    z1, z2 = torch.as_tensor(z1).float(), torch.as_tensor(z2).float()
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T
    positive = torch.diagonal(sim, b).mean()
    idx = torch.arange(2 * b, device=sim.device)
    same_image = (idx[:, None] % b) == (idx[None, :] % b)
    if b < 2:
        nan = float("nan")
        return {"positive_similarity": float(positive), "negative_similarity": nan, "nearest_negative_similarity": nan}
    negatives = sim.masked_fill(same_image, float("nan"))
    negative = torch.nanmean(negatives)
    nearest = negatives.nan_to_num(nan=-2.0).max(dim=1).values.mean()
    return {
        "positive_similarity": float(positive),
        "negative_similarity": float(negative),
        "nearest_negative_similarity": float(nearest),
    }


def _pred_of(output: Any) -> torch.Tensor:
    return output["pred"] if isinstance(output, Mapping) else output


class ContrastiveMetric(Metric):
    """Ignite metric: mean NT-Xent loss or one collapse diagnostic over an epoch of ``cat([z1, z2])`` outputs.

    Batch means are weighted by batch size and summed across ranks (``sync_all_reduce``). MONAI has no contrastive
    metric handler, hence this small class.

    Args:
        kind: ``"loss"``, ``"positive_similarity"``, ``"negative_similarity"`` or ``"nearest_negative_similarity"``.
        temperature: NT-Xent temperature (``kind="loss"``).
        output_transform: maps the engine output to the ``[2B, D]`` prediction (default: ``output["pred"]``).
    """

    KINDS = ("loss", "positive_similarity", "negative_similarity", "nearest_negative_similarity")

    def __init__(self, kind: str = "loss", temperature: float = 0.07, output_transform: Any = _pred_of) -> None:
        if kind not in self.KINDS:
            raise InputError("kind", f"expected one of {', '.join(self.KINDS)}, got {kind!r}")
        self.kind = kind
        self._loss = NTXentLoss(temperature, gather=False)
        super().__init__(output_transform=output_transform)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)

    @reinit__is_reduced
    def update(self, output: torch.Tensor) -> None:
        pred = torch.as_tensor(output).detach()
        z1, z2 = _split_views(pred)
        if z1.shape[0] < 2:
            return  # a batch of one image has no negatives: loss and similarities are undefined
        if self.kind == "loss":
            value = float(self._loss(pred))
        else:
            value = collapse_metrics(z1, z2)[self.kind]
        if np.isfinite(value):
            self._sum += value * z1.shape[0]
            self._count += z1.shape[0]

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum / self._count) if float(self._count) > 0 else float("nan")


def output_loss(output: Any) -> float:
    """The loss of a trainer iteration output (for ``StatsHandler`` / ``TensorBoardStatsHandler``)."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]  # decollated batch: the loss is replicated in every item
    loss = output["loss"] if isinstance(output, Mapping) else output
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def lower_is_better(current: float, best: float) -> bool:
    """Metric comparison for losses (``SupervisedEvaluator(metric_cmp_fn=...)``)."""
    return current < best


# ------------------------------------------------------------------------------------------------------ resumption
def _rng_to_tensors() -> dict[str, torch.Tensor]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_meta": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor(np_gauss, dtype=torch.float64),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_meta": torch.tensor([py_version, py_gauss is not None], dtype=torch.int64),
        "python_gauss": torch.tensor(0.0 if py_gauss is None else py_gauss, dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class RNGState:
    """Checkpointable random state of torch, NumPy and Python (stored as tensors for ``weights_only`` loading)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _rng_to_tensors()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
        pos, has_gauss = (int(v) for v in state["numpy_meta"])
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"])))
        version, has_py_gauss = (int(v) for v in state["python_meta"])
        py_gauss = float(state["python_gauss"]) if has_py_gauss else None
        random.setstate((version, tuple(int(v) for v in state["python_state"]), py_gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu())


class EngineState:
    """Handler exposing the engine it is attached to as a checkpointable object (epoch, iteration).

    Lets ``CheckpointSaver`` store the trainer's state without the config referring to the trainer from inside
    the trainer's own handler list (a circular reference).
    """

    def __init__(self) -> None:
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        return dict(self.engine.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.engine is not None and state:
            self.engine.load_state_dict(dict(state))


class KeyMetricState:
    """Checkpointable best-validation-loss tracking of a ``CheckpointSaver`` (so a resumed run keeps its best model).

    Args:
        saver: the evaluator's ``CheckpointSaver`` with ``save_key_metric=True``; None (disabled on other ranks)
            makes this a no-op.
    """

    def __init__(self, saver: Any = None) -> None:
        self.saver = saver

    def _checkpoint(self) -> Any:
        # MONAI's CheckpointSaver exposes only load_state_dict for this; the ignite Checkpoint holds the list
        return getattr(self.saver, "_key_metric_checkpoint", None) if self.saver is not None else None

    def state_dict(self) -> dict[str, Any]:
        ckpt = self._checkpoint()
        if ckpt is None:
            return {"saved": []}
        return {"saved": [[float(item.priority), str(item.filename)] for item in ckpt._saved]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ckpt = self._checkpoint()
        if ckpt is None:
            return
        ckpt.load_state_dict({"_saved": [(float(p), str(f)) for p, f in state.get("saved", [])]})


class ReseedTransforms:
    """Reseed a dataset's random transforms at every epoch start (for loaders with ``num_workers=0``).

    With worker processes, MONAI's ``worker_init_fn`` already seeds transforms from torch's generator; in-process
    loading would otherwise keep one stream that a resumed run cannot reproduce. With ``seed=None`` the seed is
    drawn from torch's (checkpointed) generator, so a resumed run continues the exact augmentation sequence; a
    fixed ``seed`` gives identical views every epoch (used for validation so its loss is comparable).

    Args:
        dataset: the dataset whose ``transform`` to reseed.
        seed: fixed seed, or None to draw one from torch's global generator.
        num_workers: the loader's workers; nothing is done when > 0.
    """

    def __init__(self, dataset: Any, seed: int | None = None, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.num_workers = int(num_workers)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if self.num_workers > 0:
            return
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        set_rnd(self.dataset, seed)


_EPOCH_FILE = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def run_trainer(trainer: Engine) -> Engine:
    """Run a training engine (the bundles' ``run`` step) with its large activations and gradients reusing freed
    heap memory (:func:`memscan.parallel.reuse_freed_memory`; ~20% faster bfloat16 ResNet-18 steps on a CPU)."""
    with reuse_freed_memory():
        trainer.run()
    return trainer


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    """Newest readable ``checkpoint_epoch=N.pt`` in ``ckpt_dir``, or None (then the bundle starts from scratch).

    A file truncated by a kill during writing is skipped in favour of the previous epoch's.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if (m := _EPOCH_FILE.search(p.name))), reverse=True
    )
    for _, path in found:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # a partially written file: fall back to the previous one
            logger.warning("skipping unreadable checkpoint %s", path)
            continue
        return str(path)
    return None


# ------------------------------------------------------------------------------------------------ bundles and data
def bundle_dir(spatial_dims: int) -> Path:
    """Folder of the bundle for ``spatial_dims`` (``bundles/memscan_cxr_2d`` or ``bundles/memscan_knee_3d``).

    Raises:
        InputError: when the bundles folder is not next to the installed package.
    """
    if spatial_dims not in BUNDLES:
        raise InputError("spatial_dims", f"expected 2 or 3, got {spatial_dims!r}")
    path = Path(__file__).resolve().parent.parent / "bundles" / BUNDLES[spatial_dims]
    if not (path / "configs" / "train.json").is_file():
        raise InputError(path, "bundle not found (memscan must be installed from its source tree: pip install -e .)")
    return path


def bundle_root(default: str | None = None) -> str:
    """The bundle folder of the config being parsed: the parent of the ``configs/`` folder it was read from.

    ``monai.bundle`` does not pass the config file's location into the config, so this looks for the running
    :class:`monai.bundle.ConfigWorkflow` (used by ``python -m monai.bundle run`` and by :func:`train_encoder`) on
    the call stack and returns its config root. Falls back to ``default`` or the working directory.
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, ConfigWorkflow):
                root = Path(candidate.config_root_path).resolve()
                return str(root.parent if root.name == "configs" else root)
            frame = frame.f_back
    finally:
        del frame
    return str(Path(default).resolve()) if default else os.getcwd()


def split_source(dataset_dir: str | Path, split: str) -> str:
    """``dataset_dir/<split>`` (a folder) or ``dataset_dir/<split>.csv`` (a manifest), whichever exists.

    Raises:
        InputError: when neither exists.
    """
    base = Path(dataset_dir)
    for candidate in (base / split, base / f"{split}.csv"):
        if candidate.exists():
            return str(candidate)
    raise InputError(base, f"expected a '{split}/' folder or a '{split}.csv' manifest in the dataset directory")


def contrastive_dataset(
    records: Sequence[Mapping[str, Any]],
    preprocess: Any,
    augment: str = "paper",
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    name: str = "train",
) -> Any:
    """Dataset yielding ``view1`` / ``view2``: each file is decoded and preprocessed once, augmented every step.

    ``memscan.data.make_dataset`` over ``preprocess_transforms`` followed by ``view_transforms`` (flattened into one
    ``Compose`` so the cache covers every deterministic step before the first random one).

    Args:
        records: ``{"image": path, ...}`` dicts (``ImageSet.records``).
        preprocess: a ``memscan.data.PreprocessConfig``.
        augment: view augmentation family (``"paper"`` or ``"default"``).
        num_workers: threads used to fill the in-memory cache.
        cache_dir: persistent on-disk cache (None: in memory).
        name: the set's name, for error messages.

    Raises:
        InputError: an empty set.
    """
    from monai.transforms import Compose

    from memscan import data

    if len(records) == 0:
        raise InputError(name, "no images to train on")
    transform = Compose(
        [data.preprocess_transforms(preprocess), data.view_transforms(preprocess, augment=augment, keep_image=False)]
    ).flatten()
    return data.make_dataset(records, transform, cache_dir=cache_dir, num_workers=max(int(num_workers), 1))


def check_batch_size(batch_size: Any, source: str = "batch_size") -> int:
    """``batch_size`` as an int when it is one of at least 2 (a contrastive step needs negatives).

    Raises:
        InputError: naming ``source`` (the setting or command-line option).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        raise InputError(source, f"needs at least 2 images per step (negatives), got {batch_size!r}")
    return int(batch_size)


def fit_batch_size(batch_size: int, dataset: Sized, name: str = "train") -> int:
    """The training loader's batch size: ``batch_size``, or the images one rank holds when that is fewer.

    The loader drops its last incomplete batch (every step needs the same shape across ranks), so a set smaller
    than the batch would train on nothing; it trains on all its images in one step per epoch instead, with a
    warning. Under ``torch.distributed`` each rank holds ``ceil(len(dataset) / world_size)`` images.

    Raises:
        InputError: fewer than 2 images per rank (a step needs negatives) or a batch size below 2.
    """
    check_batch_size(batch_size)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    per_rank = -(-len(dataset) // world)
    if per_rank < 2:
        raise InputError(name, f"has {len(dataset)} image(s) for {world} process(es): contrastive training needs "
                               "at least 2 per step")
    if per_rank < batch_size:
        if is_main_process():
            logger.warning("%s: batch_size %d exceeds the %d image(s) per process: training on all of them in one "
                           "step per epoch", name, batch_size, per_rank)
        return int(per_rank)
    return int(batch_size)


# --------------------------------------------------------------------------------------------------- distribution
def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialised process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@functools.cache
def _tensorboard_installed() -> bool:
    """Whether torch's TensorBoard ``SummaryWriter`` can be imported (it needs the optional ``tensorboard`` package)."""
    available = optional_import("torch.utils.tensorboard", name="SummaryWriter")[1]
    if not available:
        logger.warning("TensorBoard logs are skipped: the tensorboard package is not installed "
                       "(pip install 'memscan[tracking]' to write them)")
    return available


def writes_tensorboard() -> bool:
    """True on the main process when tensorboard is installed: the bundles' ``TensorBoardStatsHandler`` condition.

    MONAI's handler raises without the package; tensorboard is an optional extra (``memscan[tracking]``), so a
    plain install trains with console logs only (one warning says so).
    """
    return is_main_process() and _tensorboard_installed()


def distributed_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when GPUs are available, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> str:
    """Initialise the torchrun process group: ``nccl`` on GPUs, ``gloo`` on CPUs. Returns the backend."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    # ignite's idist runs collectives the first time it is queried; do it now on every rank, in step, so a
    # rank-0-only handler (CheckpointSaver) querying it later cannot deadlock against the other ranks
    import ignite.distributed as idist

    idist.sync()
    return str(dist.get_backend())


def shutdown_distributed(network: nn.Module | None = None) -> None:
    """Tear the torchrun process group down on every rank together (no-op when none is initialised).

    A barrier first, so no rank closes its connections while another is still saving. Then, with ``network`` (the
    DistributedDataParallel wrapper the run trained), the wrapper's own handles on the group (its reducer, logger and
    ``process_group``) are dropped, so the group is freed here rather than at interpreter exit: a gloo group still
    held by a DDP wrapper when the process exits made a rank abort with "terminate called without an active
    exception" after all its work was saved (CI; a two-process reproduction: 4 of 60 runs with the barrier alone,
    0 of 60 with the handles dropped). The wrapper cannot run another synchronised step afterwards; its ``module``
    is untouched.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    if isinstance(network, nn.parallel.DistributedDataParallel):
        for name in ("reducer", "logger", "process_group"):
            if hasattr(network, name):
                delattr(network, name)
        gc.collect()  # free what those handles held now, while the interpreter is whole
    dist.destroy_process_group()


def to_device(network: nn.Module, device: torch.device | str, channels_last: bool = False) -> nn.Module:
    """Move a network to ``device``, optionally in channels-last memory format (matching ContrastivePrepareBatch)."""
    network = network.to(device)
    if channels_last:
        dims = sum(1 for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)) and isinstance(m, nn.Conv3d))
        network = network.to(memory_format=torch.channels_last_3d if dims else torch.channels_last)
    return network


def wrap_ddp(network: nn.Module, device: torch.device | str) -> nn.Module:
    """Wrap a network (already on ``device``) in DistributedDataParallel (``device_ids`` only on GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(network, device_ids=[device])
    return nn.parallel.DistributedDataParallel(network)


# ------------------------------------------------------------------------------------------------------- front door
def _source_overrides(value: Any, split: str) -> dict[str, Any]:
    if hasattr(value, "records"):
        return {f"{split}_records": [dict(r) for r in value.records]}
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
        return {f"{split}_records": [dict(r) for r in value]}
    path = Path(value)
    if not path.exists():
        raise InputError(path, f"{split} images not found")
    return {f"{split}_source": str(path)}


def train_encoder(
    train: Any,
    val: Any,
    *,
    spatial_dims: int,
    out_dir: str | Path,
    preset: str = "default",
    epochs: int | None = None,
    image_size: int | Sequence[int] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Train the encoder by running the bundle's ``train.json`` with :class:`monai.bundle.ConfigWorkflow`.

    Exactly what ``python -m monai.bundle run --config_file bundles/<b>/configs/train.json`` does, with the
    preset's values and the arguments below as overrides. Rerunning with the same ``out_dir`` resumes from the
    last completed epoch; the run's encoder settings (``encoder.json``) are written before training, so a rerun of
    a different encoder into a folder holding checkpoints is refused instead of failing to load them.

    Args:
        train: training images: a folder or CSV manifest path, an ``ImageSet`` or a list of records.
        val: held-out validation images (for validation loss and model selection), same kinds.
        spatial_dims: 2 (chest X-ray bundle) or 3 (knee MRI bundle).
        out_dir: run folder: checkpoints (``model.pt`` = best by validation loss) and TensorBoard logs.
        preset: ``"default"`` or ``"paper"`` (see :data:`PRESETS`).
        epochs: override the preset's number of epochs.
        image_size: override the preset's input size (int or per-axis list).
        overrides: any other bundle config ids, e.g. ``{"device": "cpu", "num_workers": 0}``.

    Returns:
        Path of the best checkpoint (``out_dir/model.pt``), a plain state_dict.

    Raises:
        InputError: bad inputs, ``out_dir`` holding checkpoints of a different encoder (dimensionality,
            architecture, embedding size or preprocessing), or when training finished without producing a checkpoint.
    """
    from monai.bundle import ConfigWorkflow

    from memscan.io import write_json_atomic

    root = bundle_dir(spatial_dims)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = dict(globals()["preset"](preset, spatial_dims))
    if epochs is not None:
        if int(epochs) < 1:
            raise InputError("epochs", f"must be >= 1, got {epochs}")
        settings["max_epochs"] = int(epochs)
    if image_size is not None:
        settings["image_size"] = list(as_spatial_size(image_size, spatial_dims))
    settings.update(_source_overrides(train, "train"))
    settings.update(_source_overrides(val, "val"))
    settings.update({"ckpt_dir": str(out), "output_dir": str(out / "logs"), "dataset_dir": str(out)})
    settings.update(dict(overrides or {}))
    encoder = _encoder_settings(spatial_dims, settings, preset)
    _check_resumable(out, encoder)
    write_json_atomic(out / "encoder.json", encoder)  # before training: an interrupted run's checkpoints are described
    # logging_file=False keeps the caller's logging setup; MONAI warns about that choice, so mute that one warning
    workflows_logger = logging.getLogger("monai.bundle.workflows")
    level = workflows_logger.level
    workflows_logger.setLevel(logging.ERROR)
    try:
        workflow = ConfigWorkflow(
            config_file=str(root / "configs" / "train.json"),
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type="train",
            **settings,
        )
    finally:
        workflows_logger.setLevel(level)
    try:
        workflow.initialize()
        try:
            workflow.run()
        finally:
            workflow.finalize()
    except Exception as err:  # MONAI wraps errors raised while it builds a component; show the user's own
        cause = _user_error_in(err)
        if cause is None:
            raise
        raise cause from None
    best = out / "model.pt"
    if not best.is_file():
        raise InputError(out, "training finished without a best checkpoint (was validation run?)")
    return best


def _check_resumable(out: Path, encoder: Mapping[str, Any]) -> None:
    """One-line error when ``out`` holds checkpoints (``checkpoint_epoch=N.pt``) of an encoder other than
    ``encoder`` (the new run's :func:`_encoder_settings`): the bundle would resume from them and fail to load."""
    from memscan.networks import infer_encoder, read_state_dict

    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return
    previous = read_encoder_settings(out / "model.pt")
    if not previous:  # checkpoints from before encoder.json was written first: what their network's shapes say
        previous = infer_encoder(read_state_dict(checkpoint), checkpoint)
        encoder = {"in_channels": 1, **encoder}  # the bundles' own when the run does not set it
    changed = [f"{key} {previous.get(key)!r} → {encoder.get(key)!r}" for key in ("spatial_dims", *ENCODER_KEYS)
               if key in previous and previous.get(key) != encoder.get(key)]
    if changed:
        raise InputError(out, f"holds checkpoints of a different encoder ({'; '.join(changed)}), which a rerun "
                              f"would resume; choose another output folder, or remove this one to start over")


def _user_error_in(err: BaseException) -> MemscanError | None:
    """The first :class:`~memscan.errors.MemscanError` in ``err``'s chain of explicit causes (``raise ... from``,
    as MONAI wraps component errors), or None; an error merely raised while handling another is not followed."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, MemscanError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


#: settings that describe a trained encoder and its preprocessing (written to ``<run>/encoder.json``)
ENCODER_KEYS = ("arch", "embedding_dim", "in_channels", "image_size", "crop_pad_size", "resize", "intensity")


def read_encoder_settings(checkpoint: str | Path) -> dict[str, Any]:
    """The ``encoder.json`` written beside a checkpoint by :func:`train_encoder` (``spatial_dims``, the preset and
    :data:`ENCODER_KEYS`), or ``{}`` when there is none.

    Raises:
        InputError: the file exists but is not a readable JSON object.
    """
    import json

    sidecar = Path(checkpoint).with_name("encoder.json")
    if not sidecar.is_file():
        return {}
    try:
        saved = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise InputError(sidecar, f"unreadable encoder settings ({err})") from None
    if not isinstance(saved, dict):
        raise InputError(sidecar, "expected a JSON object of encoder settings")
    return saved


def _encoder_settings(spatial_dims: int, settings: Mapping[str, Any], preset_name: str) -> dict[str, Any]:
    """What ``encoder.json`` records of a run: ``spatial_dims``, the preset and :data:`ENCODER_KEYS` (lists, as JSON
    reads them back)."""
    info: dict[str, Any] = {"spatial_dims": spatial_dims, "preset": preset_name}
    for key in ENCODER_KEYS:
        if key in settings:
            value = settings[key]
            info[key] = list(value) if isinstance(value, (list, tuple)) else value
    return info

"""Encoder networks for the self-supervised embedding (MONAI nets, 2D and 3D through ``spatial_dims``).

The embedding is the network's output: a ResNet / DenseNet whose classification head has ``embedding_dim`` outputs,
as in Dar et al. (ResNet-50 with a 128-d head for chest X-ray, a 32-d head for knee MRI). Weights are never
downloaded (``pretrained`` is always False); checkpoints are plain state_dicts loaded with ``weights_only=True``.
"""

from __future__ import annotations

import pickle  # noqa: S403 - only for its exception type; nothing is unpickled
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks import nets
from torch import nn

from memscan.errors import InputError

__all__ = ["ARCHITECTURES", "Encoder", "build_encoder", "load_encoder_checkpoint", "unwrap", "embedding_dim_of",
           "read_state_dict", "infer_encoder", "fold_batch_norm", "FusedConv", "NonNegativeMaxPool",
           "fuse_conv_activations", "fusion_available"]

# name -> MONAI ResNet factory; densenet121 is handled separately (different constructor arguments)
_RESNETS = {
    "resnet10": nets.resnet10,
    "resnet18": nets.resnet18,
    "resnet34": nets.resnet34,
    "resnet50": nets.resnet50,
    "resnet101": nets.resnet101,
    "resnet152": nets.resnet152,
}
ARCHITECTURES: tuple[str, ...] = (*_RESNETS, "densenet121")


class Encoder(nn.Module):
    """A MONAI backbone whose output is the embedding, optionally L2-normalised.

    The backbone is kept as ``self.net`` so its state_dict keys are stable (``net.*``).

    Args:
        net: backbone mapping ``[B, C, *spatial]`` to ``[B, D]``.
        normalize: L2-normalise the output (cosine similarity becomes a dot product).
    """

    def __init__(self, net: nn.Module, normalize: bool = False) -> None:
        super().__init__()
        self.net = net
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return F.normalize(z, dim=1) if self.normalize else z


def build_encoder(
    spatial_dims: int,
    arch: str = "resnet50",
    embedding_dim: int = 128,
    in_channels: int = 1,
    normalize: bool = False,
) -> nn.Module:
    """Build a randomly initialised encoder from ``monai.networks.nets``.

    ResNets use the standard ImageNet stem (7×7 convolution with stride 2, then max-pooling) so a 512² chest X-ray
    or a 32×256×256 knee volume fits in GPU memory; the final fully connected layer has ``embedding_dim`` outputs.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        arch: one of :data:`ARCHITECTURES` (``resnet10`` … ``resnet152``, ``densenet121``).
        embedding_dim: size of the embedding (the network's number of outputs).
        in_channels: input channels (1 for grey-scale medical images).
        normalize: L2-normalise the embedding.

    Returns:
        An :class:`Encoder` mapping ``[B, in_channels, *spatial]`` to ``[B, embedding_dim]``.

    Raises:
        InputError: for an unknown architecture or invalid sizes.

    Example:
        >>> net = build_encoder(2, "resnet18", embedding_dim=16)
        >>> net(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 16])
    """
    if spatial_dims not in (2, 3):
        raise InputError("spatial_dims", f"expected 2 or 3, got {spatial_dims!r}")
    if int(embedding_dim) < 1 or int(in_channels) < 1:
        raise InputError("encoder", f"embedding_dim and in_channels must be >= 1, got {embedding_dim}, {in_channels}")
    name = str(arch).lower()
    if name in _RESNETS:
        net: nn.Module = _RESNETS[name](
            pretrained=False,
            spatial_dims=spatial_dims,
            n_input_channels=int(in_channels),
            num_classes=int(embedding_dim),
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=True,
        )
    elif name == "densenet121":
        net = nets.DenseNet121(
            spatial_dims=spatial_dims, in_channels=int(in_channels), out_channels=int(embedding_dim), pretrained=False
        )
    else:
        raise InputError("arch", f"unknown encoder {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    return Encoder(net, normalize=normalize)


def unwrap(network: nn.Module) -> nn.Module:
    """Return the module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def fold_batch_norm(network: nn.Module) -> nn.Module:
    """An inference copy of ``network`` with each batch norm folded into the convolution before it.

    In eval mode a batch norm is an affine map per channel, so ``conv → bn`` equals one convolution with rescaled
    weights and a bias: the copy computes the same function (to float rounding) with one memory pass fewer per
    layer (~20% faster ResNet-18 inference on a CPU). Uses ``torch.fx``'s conv–bn fusion; a network it cannot trace
    is returned unchanged, as is one in training mode (its batch statistics are not constants).

    Args:
        network: the encoder; not modified.

    Returns:
        A folded copy, or ``network`` itself when there is nothing to fold.
    """
    from torch.fx.experimental.optimization import fuse

    if network.training or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        return network
    try:
        return fuse(network, inplace=False)
    except Exception:  # noqa: BLE001 — untraceable control flow: unfolded inference is still correct
        return network


class FusedConv(nn.Module):
    """A convolution with its ReLU (and the residual added before it) in one oneDNN call, for CPU inference.

    Computes ``relu(conv(x) [+ other])`` (or ``conv(x) [+ other]`` without the activation) with weights held in
    ``dtype`` and channels-last layout; its input is cast to ``dtype``. Written by hand because eager torch has no
    CPU conv+activation fusion: it calls ``torch.ops.mkldnn._convolution_pointwise``, the oneDNN op that
    ``torch.compile`` emits for the same pattern, without a compile step. Shapes oneDNN computes wrongly in bfloat16
    (:func:`memscan.training.bf16_conv_is_unsafe`), a residual of another shape and a shape the kernel refuses take
    torch's own float32 convolution.

    Args:
        conv: the (batch-norm-folded) ``nn.Conv2d`` / ``nn.Conv3d``; not modified.
        relu: apply ReLU after the convolution (and the addition).
        residual: the call takes a second tensor added to the convolution's output.
        dtype: weight and compute dtype (``torch.float32`` or ``torch.bfloat16``).
    """

    #: names the fused kernels in embedding-cache keys (fused bfloat16 results differ from unfused in rounding)
    VERSION = "onednn-conv-pointwise-1"

    def __init__(self, conv: nn.Module, relu: bool, residual: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from memscan.training import bf16_conv_is_unsafe  # lazy: networks stays free of the engine imports

        fmt = torch.channels_last if conv.weight.ndim == 4 else torch.channels_last_3d
        weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
        self.register_buffer("weight", weight.to(dtype).contiguous(memory_format=fmt))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.register_buffer("weight32", weight.float())
        self.register_buffer("bias32", None if bias is None else bias.float())
        self.padding, self.stride = [int(p) for p in conv.padding], [int(s) for s in conv.stride]
        self.dilation, self.groups = [int(d) for d in conv.dilation], int(conv.groups)
        self.relu, self.residual, self.dtype = bool(relu), bool(residual), dtype
        self._unsafe = bf16_conv_is_unsafe if dtype == torch.bfloat16 else None
        self._unfusable: set[tuple[int, ...]] = set()  # input shapes whose residual addition runs separately
        self._failed: set[tuple[int, ...]] = set()  # input shapes oneDNN's fused kernels refused

    def _out_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        k = self.weight.shape[2:]
        spatial = ((s + 2 * p - d * (kk - 1) - 1) // st + 1
                   for s, p, d, kk, st in zip(x.shape[2:], self.padding, self.dilation, k, self.stride))
        return (x.shape[0], self.weight.shape[0], *spatial)

    def _unfused(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        """The same function in float32 with torch's own kernels."""
        conv = F.conv2d if x.ndim == 4 else F.conv3d
        with torch.autocast(x.device.type, enabled=False):
            y = conv(x.float(), self.weight32, self.bias32, self.stride, self.padding, self.dilation, self.groups)
            y = y + other.float() if other is not None else y
            return (torch.relu(y) if self.relu else y).to(self.dtype)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        unsafe = self._unsafe is not None and self._unsafe(x.shape, self.weight.shape[2:], self.stride, self.padding,
                                                           self.dilation)
        if unsafe or (other is not None and tuple(other.shape) != self._out_shape(x)) or tuple(x.shape) in self._failed:
            return self._unfused(x, other)
        x = x.to(self.dtype)
        args = (self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
        op = torch.ops.mkldnn._convolution_pointwise
        try:
            if other is None:
                return op(x, *args, "relu" if self.relu else "none", [], "")
            other = other.to(self.dtype)
            if tuple(x.shape) not in self._unfusable:
                try:
                    return op.binary(x, other, *args, "add", None, "relu" if self.relu else None, [], "")
                except RuntimeError:  # a shape whose fused sum oneDNN hands to an ATen kernel lacking bfloat16
                    self._unfusable.add(tuple(x.shape))
            y = op(x, *args, "none", [], "").add_(other)
            return y.relu_() if self.relu else y
        except RuntimeError:  # a build or CPU whose oneDNN lacks this kernel: torch's own, from now on
            self._failed.add(tuple(x.shape))
            return self._unfused(x, other)


class NonNegativeMaxPool(nn.Module):
    """Max pooling of a non-negative bfloat16 tensor (a ReLU's output) on its bit patterns as int16.

    Non-negative bfloat16 values order like their bit patterns read as integers, and torch's integer maximum is
    about 2.5× as fast on a CPU as its bfloat16 max-pooling kernel (a 3×3/2 pool after a ResNet stem: 35 -> 13 ms
    for a batch of 32 at 256²), so the pool is taken axis by axis as the maximum of strided slices. Other dtypes use
    ``torch.nn.functional.max_pool{2,3}d``. Same values as max pooling (a window of -0.0 and +0.0 may give either).

    Args:
        pool: the ``nn.MaxPool2d`` / ``nn.MaxPool3d`` (no dilation, ceil mode or indices) whose input is non-negative.
    """

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        dims = 2 if isinstance(pool, nn.MaxPool2d) else 3
        per_axis = (lambda v: tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * dims)
        self.kernel, self.padding = per_axis(pool.kernel_size), per_axis(pool.padding)
        self.stride = per_axis(pool.stride if pool.stride is not None else pool.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
            return pool(x, self.kernel, self.stride, self.padding)
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        fmt = fmt if x.is_contiguous(memory_format=fmt) else torch.contiguous_format
        out = x.view(torch.int16)
        for axis, (k, s, p) in enumerate(zip(self.kernel, self.stride, self.padding), start=2):
            n, m = out.shape[axis], (out.shape[axis] + 2 * p - k) // s + 1
            whole, partial = [], []  # each window offset t: the output range it reaches, and its strided slice
            for t in range(k):
                lo, hi = max(0, -(-(p - t) // s)), min(m, (n - 1 + p - t) // s + 1)
                if hi > lo:
                    step = (slice(None),) * axis + (slice(None, None, s),)
                    part = out.narrow(axis, lo * s - p + t, (hi - lo - 1) * s + 1)[step]
                    (whole if (lo, hi) == (0, m) else partial).append((lo, hi, part))
            res = torch.empty((*out.shape[:axis], m, *out.shape[axis + 1:]), dtype=out.dtype, memory_format=fmt)
            if len(whole) >= 2:
                torch.maximum(whole[0][2], whole[1][2], out=res)
                partial = whole[2:] + partial
            elif whole:
                res.copy_(whole[0][2])
            else:  # every window still holds an input value, and inputs are >= 0
                res.zero_()
            for lo, hi, part in partial:
                target = res.narrow(axis, lo, hi - lo)
                torch.maximum(target, part, out=target)
            out = res
        return out.view(torch.bfloat16)


def _is_relu(gm: Any, node: Any) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    return node.op == "call_function" and node.target in (torch.relu, F.relu, torch.relu_) and len(node.args) == 1


def fusion_available() -> bool:
    """Whether this torch build has oneDNN's fused convolution op (CPU builds with MKLDNN)."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def fuse_conv_activations(network: nn.Module, dtype: torch.dtype = torch.float32, inplace: bool = False
                          ) -> nn.Module:
    """A CPU inference copy of ``network`` whose convolutions run as :class:`FusedConv`, each with the ReLU after
    it, or the residual addition and ReLU after it, folded into the same oneDNN call; in bfloat16 a max pool right
    after a fused ReLU runs as :class:`NonNegativeMaxPool`.

    Every convolution's output is otherwise written to memory, read back by the ReLU (or the addition, then the
    ReLU) and written again. Measured on a 2-core CPU in bfloat16: ResNet-18 1.45×, ResNet-50 1.3×, a 3D ResNet-10
    1.3×, DenseNet-121 (pre-activation: few patterns) 1.1× as fast; float32 gains nothing. Same function to float
    rounding. Use it after :func:`fold_batch_norm` (a batch norm between convolution and ReLU
    blocks the pattern). A network ``torch.fx`` cannot trace, or a torch without the op, is returned unchanged.

    Args:
        network: an inference network in eval mode; not modified unless ``inplace``.
        dtype: the dtype the convolutions compute in (``torch.bfloat16`` under bfloat16 autocast).
        inplace: rewrite ``network`` itself when it is a ``torch.fx.GraphModule`` (a copy of its own, such as
            :func:`fold_batch_norm` returns), instead of a deep copy.

    Returns:
        A ``torch.fx.GraphModule``, or ``network`` itself when nothing can be fused.
    """
    import copy
    import operator

    from torch import fx

    if network.training or not fusion_available():
        return network
    try:
        if isinstance(network, fx.GraphModule):
            gm = network if inplace else copy.deepcopy(network)
        else:
            gm = fx.symbolic_trace(network)
    except Exception:  # noqa: BLE001 — untraceable control flow: the unfused network is still correct
        return network
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv = gm.get_submodule(node.target)
        if type(conv) not in (nn.Conv2d, nn.Conv3d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        chain, other = [node], None  # the nodes the fused call replaces, in order
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target in (operator.add, torch.add) \
                and len(users[0].args) == 2 and not users[0].kwargs and len(users[0].users) == 1:
            add = users[0]
            candidate = add.args[1] if add.args[0] is node else add.args[0]
            if isinstance(candidate, fx.Node) and candidate is not node:
                chain, other = [node, add], candidate
        after = list(chain[-1].users)
        relu = len(after) == 1 and _is_relu(gm, after[0])
        if relu:
            chain.append(after[0])
        name = f"fused_conv_{count}"
        count += 1
        gm.add_submodule(name, FusedConv(conv, relu, other is not None, dtype))
        with graph.inserting_after(chain[-1]):
            fused = graph.call_module(name, (node.args[0],) if other is None else (node.args[0], other))
        chain[-1].replace_all_uses_with(fused)
        for dead in reversed(chain):
            graph.erase_node(dead)
    if dtype == torch.bfloat16:  # a max pool right after a fused ReLU sees non-negative values
        for node in list(graph.nodes):
            pool = gm.get_submodule(node.target) if node.op == "call_module" else None
            source = node.args[0] if node.op == "call_module" and len(node.args) == 1 else None
            if type(pool) not in (nn.MaxPool2d, nn.MaxPool3d) or node.kwargs or not isinstance(source, fx.Node) \
                    or source.op != "call_module" or not isinstance(gm.get_submodule(source.target), FusedConv) \
                    or not gm.get_submodule(source.target).relu or pool.ceil_mode or pool.return_indices \
                    or pool.dilation not in (1, (1,) * (2 if type(pool) is nn.MaxPool2d else 3)):
                continue
            name = f"fused_pool_{count}"
            count += 1
            gm.add_submodule(name, NonNegativeMaxPool(pool))
            with graph.inserting_after(node):
                replacement = graph.call_module(name, (source,))
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
    if count == 0:
        return network
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def embedding_dim_of(network: nn.Module) -> int | None:
    """Number of outputs of the encoder's last linear layer, or None when it has none."""
    last = None
    for module in unwrap(network).modules():
        if isinstance(module, nn.Linear):
            last = module
    return None if last is None else int(last.out_features)


def _strip_prefix(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an encoder state_dict with ``weights_only=True`` (unwrapping ``network``/``model``/``state_dict`` keys
    and a DDP ``module.`` prefix).

    Raises:
        InputError: missing file, or not a plain tensor checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        raise InputError(path, "not a PyTorch checkpoint (expected a file written by torch.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a global: the file would run code to load
        raise InputError(path, "holds pickled Python objects, not only tensors: refused (weights_only=True); save "
                               "the network's state_dict() instead") from None
    except Exception as err:  # torch raises RuntimeError / EOFError / ValueError depending on the damage
        first = str(err).strip().split(". ")[0] if str(err).strip() else type(err).__name__
        raise InputError(path, f"damaged checkpoint, not loadable with weights_only=True ({first})") from None
    if isinstance(state, dict):
        for key in ("network", "model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "checkpoint is not a state_dict of tensors")
    return _strip_prefix(state, "module.")


def infer_encoder(state: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> dict[str, Any]:
    """Recover ``spatial_dims``, ``arch`` and ``embedding_dim`` of an encoder from its state_dict.

    Dimensionality comes from the first convolution's kernel rank, the embedding size from the last linear layer,
    the architecture from the first of :data:`ARCHITECTURES` whose parameter names and shapes all match.

    Raises:
        InputError: when no known architecture matches.
    """
    convs = [v for k, v in state.items() if k.endswith("weight") and v.ndim in (4, 5)]
    linears = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not convs or not linears:
        raise InputError(source, "not an encoder checkpoint (no convolution or final linear layer)")
    dims, dim, channels = convs[0].ndim - 2, int(linears[-1].shape[0]), int(convs[0].shape[1])
    for arch in ARCHITECTURES:
        own = build_encoder(dims, arch, dim, in_channels=channels).state_dict()
        keys = set(state) if any(k.startswith("net.") for k in state) else {"net." + k for k in state}
        if keys == set(own):
            fixed = state if any(k.startswith("net.") for k in state) else {"net." + k: v for k, v in state.items()}
            if all(own[k].shape == v.shape for k, v in fixed.items()):
                return {"spatial_dims": dims, "arch": arch, "embedding_dim": dim, "in_channels": channels}
    raise InputError(source, f"no known encoder ({', '.join(ARCHITECTURES)}) matches the checkpoint")


def load_encoder_checkpoint(network: nn.Module, path: str | Path) -> nn.Module:
    """Load a plain state_dict checkpoint into ``network`` (``torch.load(weights_only=True)``).

    Accepts the bundle's ``model.pt`` (the encoder's own state_dict), a training checkpoint holding it under
    ``"network"`` / ``"model"`` / ``"state_dict"``, and keys saved from a DDP-wrapped network (``module.``).

    Args:
        network: the encoder to fill (its architecture must match the checkpoint).
        path: checkpoint file.

    Returns:
        ``network`` with the loaded weights.

    Raises:
        InputError: one line naming the file when it is missing, not a plain tensor checkpoint, or does not fit
            the network (with both shapes for the first mismatching parameter).
    """
    path = Path(path)
    state = read_state_dict(path)
    target = unwrap(network)
    own = target.state_dict()
    if not any(k in own for k in state) and any(("net." + k) in own for k in state):
        state = {"net." + k: v for k, v in state.items()}  # a bare MONAI backbone state_dict
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise InputError(
                path,
                f"checkpoint does not fit the encoder: {key} has shape {tuple(value.shape)} in the checkpoint "
                f"but {tuple(own[key].shape)} in the network (wrong architecture, embedding size or dimensions?)",
            )
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise InputError(
            path,
            f"checkpoint does not fit the encoder: {len(missing)} missing and {len(unexpected)} unexpected "
            f"parameters (e.g. {example!r}); wrong architecture?",
        )
    target.load_state_dict(state)
    return network

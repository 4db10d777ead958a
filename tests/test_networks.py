"""Tests for memscan.networks: encoder factory (2D/3D) and weights_only checkpoint loading."""

from __future__ import annotations

import pickle

import pytest
import torch

from memscan.errors import InputError
from memscan.networks import ARCHITECTURES, build_encoder, embedding_dim_of, load_encoder_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.mark.parametrize(
    "dims, arch, shape",
    [(2, "resnet10", (3, 1, 32, 32)), (2, "resnet18", (2, 1, 40, 36)), (3, "resnet10", (2, 1, 16, 16, 16))],
)
def test_build_encoder_output_is_the_embedding(dims, arch, shape):
    net = build_encoder(dims, arch, embedding_dim=12).eval()
    out = net(torch.rand(shape))
    assert out.shape == (shape[0], 12)
    assert embedding_dim_of(net) == 12


def test_densenet_and_normalize():
    net = build_encoder(2, "densenet121", embedding_dim=8, normalize=True).eval()
    out = net(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert "densenet121" in ARCHITECTURES


@pytest.mark.parametrize("kwargs", [{"spatial_dims": 4}, {"spatial_dims": 2, "arch": "vgg"}, {"spatial_dims": 2, "embedding_dim": 0}])
def test_build_encoder_rejects_bad_settings(kwargs):
    with pytest.raises(InputError):
        build_encoder(**kwargs)


def test_load_checkpoint_roundtrip_plain_and_wrapped(tmp_path):
    torch.manual_seed(0)
    src = build_encoder(2, "resnet10", 8)
    path = tmp_path / "model.pt"
    torch.save(src.state_dict(), path)
    dst = load_encoder_checkpoint(build_encoder(2, "resnet10", 8), path)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)
    # a training checkpoint with the weights under "network", saved from a DDP-wrapped net ("module." prefix)
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"network": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": torch.tensor(3)}, wrapped)
    dst2 = load_encoder_checkpoint(build_encoder(2, "resnet10", 8), wrapped)
    torch.testing.assert_close(dst2.state_dict()["net.fc.weight"], src.state_dict()["net.fc.weight"])


def test_load_checkpoint_shape_mismatch_names_file_and_both_shapes(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build_encoder(2, "resnet10", 8).state_dict(), path)
    with pytest.raises(InputError) as err:
        load_encoder_checkpoint(build_encoder(2, "resnet10", 16), path)
    msg = str(err.value)
    assert str(path) in msg and "(8, 512)" in msg and "(16, 512)" in msg and "\n" not in msg


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary unpickling is rejected, not executed."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"net.fc.weight": Evil()}, fh)
    with pytest.raises(InputError, match="weights_only"):
        load_encoder_checkpoint(build_encoder(2, "resnet10", 8), path)


def test_load_checkpoint_names_what_the_file_is(tmp_path):
    """An image passed as the checkpoint, an empty file and a truncated checkpoint: one line each, saying which."""
    image, empty, cut = tmp_path / "scan.png", tmp_path / "empty.pt", tmp_path / "cut.pt"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    empty.write_bytes(b"")
    torch.save(build_encoder(2, "resnet10", 8).state_dict(), cut)
    cut.write_bytes(cut.read_bytes()[:300])
    for path, reason in ((image, "not a PyTorch checkpoint"), (empty, "not a PyTorch checkpoint"),
                         (cut, "damaged checkpoint")):
        with pytest.raises(InputError) as err:
            load_encoder_checkpoint(build_encoder(2, "resnet10", 8), path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: {reason}") and "\n" not in msg and len(msg) < 250, msg


def test_load_checkpoint_missing_and_wrong_architecture(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_encoder_checkpoint(build_encoder(2, "resnet10", 8), tmp_path / "nope.pt")
    path = tmp_path / "r18.pt"
    torch.save(build_encoder(2, "resnet18", 8).state_dict(), path)
    with pytest.raises(InputError, match="does not fit"):
        load_encoder_checkpoint(build_encoder(2, "resnet10", 8), path)


def _with_running_stats(net: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial batch-norm statistics (so folding changes the weights), eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.2 - 0.1)
    return net.eval()


@pytest.mark.parametrize("dims, arch, shape", [(2, "resnet10", (3, 1, 32, 32)), (3, "resnet10", (2, 1, 16, 16, 16)),
                                               (2, "resnet50", (2, 1, 32, 32)), (2, "densenet121", (2, 1, 32, 32))])
def test_fused_convolutions_compute_the_same_function(dims, arch, shape) -> None:
    """Convolutions fused with their ReLU / residual addition (oneDNN) give the unfused network's outputs: exactly
    in float32 (to rounding), to bfloat16 rounding in bfloat16; the ReLUs and additions leave the graph; the
    network itself is untouched."""
    from memscan.networks import FusedConv, fold_batch_norm, fuse_conv_activations, fusion_available

    if not fusion_available():
        pytest.skip("this torch build has no oneDNN fused convolution")
    torch.manual_seed(0)
    net = _with_running_stats(build_encoder(dims, arch, 16))
    x = torch.rand(*shape)
    with torch.inference_mode():
        expected = net(x)
        fused32 = fuse_conv_activations(fold_batch_norm(net), torch.float32)
        torch.testing.assert_close(fused32(x), expected, rtol=1e-4, atol=1e-4)
        fused16 = fuse_conv_activations(fold_batch_norm(net), torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fused16(x).float()
    convs = [m for m in fused16.modules() if isinstance(m, FusedConv)]
    assert convs and not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) for m in fused16.modules())
    if arch.startswith("resnet"):  # post-activation blocks: every ReLU and residual addition is folded in
        assert all(m.relu for m in convs if not m.residual) or any(m.residual for m in convs)
        assert "relu" not in fused16.code and " + " not in fused16.code
    assert float(torch.corrcoef(torch.stack([low.flatten(), expected.flatten()]))[0, 1]) > 0.999
    assert any(isinstance(m, torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm3d) for m in net.modules())


def test_fused_convolution_guards_unsafe_bf16_shapes_and_mismatched_residuals(monkeypatch) -> None:
    """Shapes oneDNN computes wrongly in bfloat16 (the innermost output axis of size 1 under a stride) and a
    residual that only broadcasts run the unfused float32 path, never the fused kernel."""
    from memscan.networks import FusedConv, fusion_available
    from memscan.training import _native_low_precision

    if not fusion_available():
        pytest.skip("this torch build has no oneDNN fused convolution")
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 8, 3, stride=2, padding=1)
    calls = []
    real = torch.ops.mkldnn._convolution_pointwise

    class Spy:
        def __call__(self, *args, **kwargs):
            calls.append("unary")
            return real(*args, **kwargs)

        def binary(self, *args, **kwargs):
            calls.append("binary")
            return real.binary(*args, **kwargs)

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", Spy())
    fused = FusedConv(conv, relu=True, residual=True, dtype=torch.bfloat16)
    with torch.inference_mode():
        x = torch.rand(2, 4, 8, 8, 2)  # innermost output axis: (2 + 2 - 3) // 2 + 1 = 1 under stride 2
        other = torch.rand(2, 8, 4, 4, 1)
        y = fused(x, other)
        torch.testing.assert_close(y.float(), torch.relu(conv(x) + other), rtol=1e-2, atol=1e-2)
        assert calls == []
        x = torch.rand(2, 4, 8, 8, 8)
        y = fused(x, torch.rand(1, 8, 1, 1, 1))  # broadcast residual: not the fused op's contract
        assert calls == [] and tuple(y.shape) == (2, 8, 4, 4, 4)
        y = fused(x, other := torch.rand(2, 8, 4, 4, 4))
        torch.testing.assert_close(y.float(), torch.relu(conv(x) + other), rtol=1e-2, atol=1e-2)
        if _native_low_precision("cpu"):
            assert calls == ["binary"]
        else:  # oneDNN's bf16 kernels need AVX-512 (or AVX-NE-CONVERT): refused, so this shape runs float32 from now on
            assert calls[0] == "binary" and tuple(x.shape) in fused._failed
            calls.clear()
            fused(x, other)
            assert calls == []


def test_fusion_leaves_the_network_unchanged_without_the_op(monkeypatch) -> None:
    from memscan import networks

    net = build_encoder(2, "resnet10", 8).eval()
    monkeypatch.setattr(networks, "fusion_available", lambda: False)
    assert networks.fuse_conv_activations(net, torch.bfloat16) is net
    assert networks.fuse_conv_activations(net.train(), torch.bfloat16) is net


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 8, 9, 11), 3, 2, 1), ((2, 8, 10, 10), 2, 2, 0), ((2, 8, 7, 9), 3, 1, 1), ((2, 8, 12, 12), 5, 3, 2),
    ((2, 8, 6, 8, 10), 3, 2, 1), ((1, 4, 5, 5), (3, 1), 2, (1, 0)),
])
def test_non_negative_max_pool_equals_max_pooling(shape, kernel, stride, padding) -> None:
    """Max pooling on the int16 bit patterns of non-negative bfloat16 values equals torch's max pooling (2D and 3D,
    borders, odd sizes, channels-last or not); other dtypes go to torch's kernel."""
    import torch.nn.functional as F

    from memscan.networks import NonNegativeMaxPool

    dims = len(shape) - 2
    pool_cls = torch.nn.MaxPool2d if dims == 2 else torch.nn.MaxPool3d
    pool = pool_cls(kernel, stride, padding)
    x = torch.relu(torch.randn(*shape, generator=torch.Generator().manual_seed(2))).to(torch.bfloat16)
    x[0, 0].fill_(0.0)  # a plane of zeros (ties)
    fast = NonNegativeMaxPool(pool)
    for layout in (torch.contiguous_format, torch.channels_last if dims == 2 else torch.channels_last_3d):
        xl = x.contiguous(memory_format=layout)
        assert torch.equal(fast(xl), pool(xl))
    xf = x.float()
    assert torch.equal(fast(xf), (F.max_pool2d if dims == 2 else F.max_pool3d)(xf, kernel, stride, padding))


def test_max_pool_is_replaced_only_after_a_fused_relu() -> None:
    from memscan.networks import NonNegativeMaxPool, fold_batch_norm, fuse_conv_activations, fusion_available

    if not fusion_available():
        pytest.skip("this torch build has no oneDNN fused convolution")

    class PoolFirst(torch.nn.Module):  # the pool sees raw (possibly negative) inputs: must stay torch's
        def __init__(self) -> None:
            super().__init__()
            self.pool = torch.nn.MaxPool2d(3, 2, 1)
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.act = torch.nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.conv(self.pool(x)))

    fused = fuse_conv_activations(PoolFirst().eval(), torch.bfloat16)
    assert not any(isinstance(m, NonNegativeMaxPool) for m in fused.modules())
    net = _with_running_stats(build_encoder(2, "resnet10", 8))
    assert sum(isinstance(m, NonNegativeMaxPool) for m in fuse_conv_activations(fold_batch_norm(net),
                                                                                 torch.bfloat16).modules()) == 1
    assert not any(isinstance(m, NonNegativeMaxPool)
                   for m in fuse_conv_activations(fold_batch_norm(net), torch.float32).modules())


def test_fused_bf16_convolutions_agree_with_float32_on_a_sample_of_shapes() -> None:
    """A sample of the sweep in benchmarks/fused_bf16_grid.py: on the shapes the oneDNN guard calls safe, the fused
    bfloat16 kernel (ReLU, residual) agrees with float32 to bfloat16 rounding (the full grid: docs/benchmarks)."""
    import random
    import sys
    from pathlib import Path

    from memscan.networks import fusion_available

    if not fusion_available():
        pytest.skip("this torch build has no oneDNN fused convolution")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from fused_bf16_grid import shapes, sweep
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    calls, wrong = sweep(random.Random(1).sample(shapes(), 150))
    assert calls > 100 and wrong == []


def test_fused_convolution_falls_back_when_the_kernel_refuses(monkeypatch) -> None:
    """A torch build whose oneDNN lacks the fused kernel for a shape (it raises) gets torch's own convolution, and
    that shape is not tried again."""
    from memscan.networks import FusedConv, fusion_available

    if not fusion_available():
        pytest.skip("this torch build has no oneDNN fused convolution")
    calls = []

    class Refusing:
        def __call__(self, *args, **kwargs):
            calls.append(1)
            raise RuntimeError("unsupported")

        def binary(self, *args, **kwargs):
            calls.append(1)
            raise RuntimeError("unsupported")

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", Refusing())
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    fused = FusedConv(conv, relu=True, residual=False, dtype=torch.bfloat16)
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(fused(x).float(), torch.relu(conv(x)), rtol=1e-2, atol=1e-2)
    assert len(calls) == 1

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


def test_load_checkpoint_missing_and_wrong_architecture(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_encoder_checkpoint(build_encoder(2, "resnet10", 8), tmp_path / "nope.pt")
    path = tmp_path / "r18.pt"
    torch.save(build_encoder(2, "resnet18", 8).state_dict(), path)
    with pytest.raises(InputError, match="does not fit"):
        load_encoder_checkpoint(build_encoder(2, "resnet10", 8), path)

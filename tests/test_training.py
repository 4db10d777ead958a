"""Tests for memscan.training: two-view batches, NT-Xent (float32, cross-rank gather), collapse metrics,
resumable state, presets and train_encoder()."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.losses import ContrastiveLoss

from memscan.errors import InputError
from memscan.training import (
    PRESETS,
    ContrastiveMetric,
    ContrastivePrepareBatch,
    NTXentLoss,
    RNGState,
    as_spatial_size,
    bundle_dir,
    collapse_metrics,
    contrastive_dataset,
    fit_batch_size,
    latest_checkpoint,
    preset,
    shutdown_distributed,
    split_source,
)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_prepare_batch_stacks_the_two_views():
    batch = {"view1": torch.zeros(3, 1, 8, 8), "view2": torch.ones(3, 1, 8, 8), "image": torch.rand(3, 1, 8, 8)}
    x, y = ContrastivePrepareBatch()(batch, torch.device("cpu"))
    assert y is None and x.shape == (6, 1, 8, 8)
    assert x[:3].sum() == 0 and x[3:].min() == 1
    x3, _ = ContrastivePrepareBatch(channels_last=True)({"view1": torch.rand(2, 1, 4, 4, 4), "view2": torch.rand(2, 1, 4, 4, 4)})
    assert x3.is_contiguous(memory_format=torch.channels_last_3d)


def test_ntxent_matches_monai_and_runs_in_float32():
    torch.manual_seed(0)
    z = torch.randn(8, 5)
    expected = ContrastiveLoss(temperature=0.07)(z[:4], z[4:])
    torch.testing.assert_close(NTXentLoss(0.07)(z), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = NTXentLoss(0.07)(z.to(torch.bfloat16))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    # matching views give a lower loss than unrelated ones
    a = torch.randn(6, 16)
    assert NTXentLoss(0.1)(torch.cat([a, a + 0.01 * torch.randn_like(a)])) < NTXentLoss(0.1)(torch.randn(12, 16))
    with pytest.raises(ValueError):
        NTXentLoss()(torch.randn(5, 3))
    with pytest.raises(InputError):
        NTXentLoss(temperature=0)


def test_collapse_metrics_sanity():
    torch.manual_seed(0)
    z = torch.randn(16, 32)
    perfect = collapse_metrics(z, z)
    assert perfect["positive_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert abs(perfect["negative_similarity"]) < 0.2
    assert perfect["negative_similarity"] < perfect["nearest_negative_similarity"] < 1.0
    collapsed = collapse_metrics(torch.ones(4, 8), torch.ones(4, 8))
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in collapsed.values())


def test_contrastive_metric_weights_batches_and_skips_singletons():
    torch.manual_seed(0)
    metric = ContrastiveMetric("positive_similarity")
    z = torch.randn(4, 8)
    metric.update(torch.cat([z, z]))
    metric.update(torch.cat([z[:1], -z[:1]]))  # one image: no negatives, ignored
    assert metric.compute() == pytest.approx(1.0, abs=1e-5)
    loss = ContrastiveMetric("loss", temperature=0.5)
    loss.update(torch.cat([z, z]))
    assert loss.compute() == pytest.approx(float(ContrastiveLoss(0.5)(z, z)), rel=1e-5)


def _gather_worker(rank: int, world: int, port: int, z: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = z.shape[0] // 2 // world
        z1, z2 = z[: z.shape[0] // 2], z[z.shape[0] // 2 :]
        local = torch.cat([z1[rank * b : (rank + 1) * b], z2[rank * b : (rank + 1) * b]]).clone().requires_grad_(True)
        loss = NTXentLoss(0.2)(local)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, f"{out}/rank{rank}.pt")
    finally:
        shutdown_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shutdown_distributed_frees_the_group_and_the_wrappers_handles(monkeypatch):
    """``shutdown_distributed(network)``: a no-op without a group; with one (single-process gloo here) a barrier, the
    DDP wrapper's reducer, logger and process-group handles dropped (its module and weights kept), the group
    destroyed."""
    shutdown_distributed()  # nothing initialised: nothing to do
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        net(torch.randn(3, 4)).sum().backward()
        weight = net.module.weight.detach().clone()
        shutdown_distributed(net)
        assert not dist.is_initialized()
        assert not any(hasattr(net, name) for name in ("reducer", "logger", "process_group"))
        torch.testing.assert_close(net.module.weight, weight)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cross_rank_gather_gives_global_negatives_and_exact_gradients(tmp_path):
    """Two gloo processes with half the batch each reproduce the single-process loss; the summed-gathered gradients
    averaged by DDP equal the single-process gradient."""
    torch.manual_seed(0)
    z = torch.randn(8, 6)
    # fork: the workers inherit the imported modules instead of re-importing MONAI
    mp.start_processes(_gather_worker, args=(2, _free_port(), z, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    full = z.clone().requires_grad_(True)
    ref = NTXentLoss(0.2)(full)
    ref.backward()
    g = full.grad
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(res["loss"], ref.detach())
        rows = list(range(rank * 2, rank * 2 + 2)) + list(range(4 + rank * 2, 4 + rank * 2 + 2))
        # each rank's gradient is world_size x the global gradient of its rows; DDP divides by world_size
        torch.testing.assert_close(res["grad"] / 2, g[rows])


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    state = RNGState()
    path = tmp_path / "rng.pt"
    torch.save({"rng": state.state_dict()}, path)
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.manual_seed(123), np.random.seed(123)
    state.load_state_dict(torch.load(path, weights_only=True)["rng"])
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert __import__("random").random() == expected[2]


def test_latest_checkpoint_skips_truncated_files(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    torch.save({"a": torch.ones(100)}, tmp_path / "checkpoint_epoch=1.pt")
    torch.save({"a": torch.ones(100)}, tmp_path / "checkpoint_epoch=2.pt")
    data = (tmp_path / "checkpoint_epoch=2.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=10.pt").write_bytes(data[: len(data) // 2])  # killed while writing
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=2.pt")


def test_presets_match_the_paper_and_the_bundles():
    p2, p3 = preset("paper", 2), preset("paper", 3)
    assert (p2["arch"], p2["embedding_dim"], p2["image_size"], p2["temperature"], p2["batch_size"]) == (
        "resnet50", 128, [512, 512], 0.07, 64)
    assert (p2["learning_rate"], p2["min_learning_rate"], p2["max_epochs"], p2["augment"]) == (1e-4, 5e-5, 200, "paper")
    assert (p3["embedding_dim"], p3["image_size"], p3["batch_size"], p3["learning_rate"], p3["max_epochs"]) == (
        32, [32, 256, 256], 10, 1e-4, 200)
    # the bundles' train.json top-level values are the paper preset, and metadata declares the embedding size
    for dims in (2, 3):
        cfg = json.loads((bundle_dir(dims) / "configs" / "train.json").read_text())
        for key, value in PRESETS["paper"][dims].items():
            assert cfg[key] == value, (dims, key)
        assert set(PRESETS["default"][dims]) <= set(cfg)  # every preset key is a top-level config id
        meta = json.loads((bundle_dir(dims) / "configs" / "metadata.json").read_text())
        assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == PRESETS["paper"][dims]["embedding_dim"]
    with pytest.raises(InputError):
        preset("fast", 2)
    assert as_spatial_size(32, 3) == (32, 32, 32)
    with pytest.raises(InputError):
        as_spatial_size([32, 32], 3)


def test_split_source(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val.csv").write_text("image\n")
    assert split_source(tmp_path, "train").endswith("train")
    assert split_source(tmp_path, "val").endswith("val.csv")
    with pytest.raises(InputError, match="synthetic"):
        split_source(tmp_path, "synthetic")


def test_two_views_of_one_image_differ(tiny_2d_folder):
    from memscan.data import PreprocessConfig, load_image_set

    records = load_image_set(tiny_2d_folder(n=2), "train").records
    ds = contrastive_dataset(records, PreprocessConfig(spatial_dims=2, spatial_size=32), augment="paper")
    from monai.data.utils import set_rnd

    set_rnd(ds, 0)
    item = ds[0]
    assert item["view1"].shape == item["view2"].shape == (1, 32, 32)
    assert not torch.equal(torch.as_tensor(item["view1"]), torch.as_tensor(item["view2"]))
    with pytest.raises(InputError):
        contrastive_dataset([], PreprocessConfig(spatial_dims=2, spatial_size=32))


def test_memscan_train_cli_runs_train_encoder_and_the_bundle(tiny_2d_folder, tmp_path, capsys):
    from memscan.cli import main
    from memscan.embed import load_encoder

    train, val = tiny_2d_folder(n=8, name="train"), tiny_2d_folder(n=4, name="val")
    run = tmp_path / "run"
    code = main(["train", "--train", str(train), "--val", str(val), "--dims", "2", "--out", str(run), "--epochs", "1",
                 "--image-size", "32", "--arch", "resnet10", "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    assert code == 0
    best = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert best == (run / "model.pt").resolve() and best.is_file()
    assert latest_checkpoint(run).endswith("checkpoint_epoch=1.pt")
    settings = json.loads((run / "encoder.json").read_text())
    assert settings["arch"] == "resnet10" and settings["image_size"] == [32, 32] and settings["preset"] == "default"
    net, cfg = load_encoder(best)  # plain state_dict + encoder.json: ready for memscan embed / audit
    assert cfg.size == (32, 32) and net(torch.rand(2, 1, 32, 32)).shape == (2, 128)
    # bad input: one line, exit 2, nothing trained
    code = main(["train", "--train", str(train), "--val", str(tmp_path / "missing"), "--dims", "2",
                 "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing" in err[0]
    # a different encoder into the same folder would resume checkpoints it cannot load: one line, nothing touched
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    code = main(["train", "--train", str(train), "--val", str(val), "--dims", "2", "--out", str(run), "--epochs", "2",
                 "--image-size", "32", "--arch", "resnet18", "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(run) in err[0] and "'resnet10' → 'resnet18'" in err[0], err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before
    # checkpoints without encoder.json (written by an older memscan): the network's parameter shapes decide
    (run / "encoder.json").unlink()
    code = main(["train", "--train", str(train), "--val", str(val), "--dims", "2", "--out", str(run), "--epochs", "2",
                 "--image-size", "32", "--arch", "resnet18", "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(run) in err[0] and "'resnet10' → 'resnet18'" in err[0], err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir() if p.name != "encoder.json") == [
        entry for entry in before if entry[0] != "encoder.json"]


def test_autocast_inferer_bf16_on_cpu_returns_float32_close_to_fp32():
    from memscan.networks import build_encoder
    from memscan.training import AutocastInferer, _native_low_precision

    if not _native_low_precision("cpu"):
        pytest.skip("this CPU has no native bfloat16: AutocastInferer runs in float32 here")

    torch.manual_seed(0)
    net = build_encoder(2, "resnet10", 8).eval()
    x = torch.rand(2, 1, 32, 32)
    ref = AutocastInferer(enabled=False)(x, net)
    out = AutocastInferer(enabled=True)(x, net)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=0.1, atol=0.1) and not torch.equal(out, ref)


@pytest.mark.parametrize("dims", [2, 3])
def test_bf16_conv_guard_rule(dims):
    from memscan.training import bf16_conv_is_unsafe

    # innermost output axis of size 1 under a stride (pytorch/pytorch#169688)
    assert bf16_conv_is_unsafe((8, 64, *(8,) * (dims - 1), 2), (3,) * dims, 2, 1)
    assert bf16_conv_is_unsafe((8, 64, *(8,) * (dims - 1), 3), (3,) * dims, 3, 1)
    # 3D only: a first axis of size 1 with a channel count that is not a multiple of 16
    assert bf16_conv_is_unsafe((2, 1, 1, *(9,) * (dims - 1)), (3,) * dims, 1, 1) == (dims == 3)
    assert bf16_conv_is_unsafe((2, 8, 1, *(8,) * (dims - 1)), (3,) * dims, 1, 1) == (dims == 3)
    assert not bf16_conv_is_unsafe((2, 64, 1, *(8,) * (dims - 1)), (3,) * dims, 1, 1)
    # ordinary layers keep the fast bf16 kernels: stride 1, 1x1 kernels, larger innermost axes
    assert not bf16_conv_is_unsafe((8, 64, *(8,) * (dims - 1), 4), (3,) * dims, 1, 1)
    assert not bf16_conv_is_unsafe((8, 64, *(8,) * (dims - 1), 2), (1,) * dims, 2, 0)
    assert not bf16_conv_is_unsafe((8, 64, *(8,) * (dims - 1), 3), (3,) * dims, 2, 1)
    assert not bf16_conv_is_unsafe((8, 64, *(8,) * dims), (3,) * dims, 2, 1)
    assert not bf16_conv_is_unsafe((8, 1, *(32,) * dims), (7,) * dims, 2, 3)


def test_autocast_inferer_bf16_3d_encoder_with_thin_last_axis_matches_fp32():
    """Regression: a 3D encoder whose innermost axis shrinks to 1-2 (demo volumes 32x32x8) gave garbage or NaN
    under CPU bf16 autocast (oneDNN's strided bf16 conv3d with one output column, pytorch/pytorch#169688), so the 3D
    demo trained to NaN validation loss depending on what ran earlier in the process."""
    from memscan.networks import build_encoder
    from memscan.training import AutocastInferer, Float32UnsafeConvs, _native_low_precision

    if not _native_low_precision("cpu"):
        pytest.skip("this CPU has no native bfloat16: AutocastInferer runs in float32 here")
    torch.manual_seed(0)
    x = torch.rand(8, 1, 32, 32, 8)
    for training in (True, False):
        net = build_encoder(3, "resnet10", 32).train(training)
        ref = AutocastInferer(enabled=False)(x, net)
        out = AutocastInferer(enabled=True)(x, net)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    # single convolutions: strided with one output column on the innermost axis; a single-slice, single-channel
    # volume (the second oneDNN bug: first axis of size 1)
    for conv, x, shape in ((torch.nn.Conv3d(16, 32, 3, stride=2, padding=1, bias=False), torch.randn(4, 16, 8, 8, 2),
                            (4, 32, 4, 4, 1)),
                           (torch.nn.Conv3d(1, 32, 3, padding=1, bias=False), torch.randn(4, 1, 1, 8, 8),
                            (4, 32, 1, 8, 8))):
        ref = conv(x)
        out = AutocastInferer(enabled=True)(x, conv)
        assert out.shape == shape and torch.isfinite(out).all()
        assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    # the guard leaves ordinary convolutions in bf16 (it must not silently turn autocast off)
    conv = torch.nn.Conv3d(16, 32, 3, stride=2, padding=1, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), Float32UnsafeConvs():
        assert conv(torch.randn(2, 16, 8, 8, 8)).dtype == torch.bfloat16
        assert conv(torch.randn(2, 16, 8, 8, 2)).dtype == torch.float32


def test_fit_batch_size_clamps_to_the_images_a_rank_holds(monkeypatch, caplog):
    """The loader drops its last incomplete batch, so a batch larger than the set would train on nothing."""
    with caplog.at_level("WARNING", logger="memscan.training"):
        assert fit_batch_size(64, range(100)) == 64
        assert not caplog.records
        assert fit_batch_size(64, range(40)) == 40
    assert "batch_size 64 exceeds the 40 image(s)" in caplog.records[-1].getMessage()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert fit_batch_size(64, range(41)) == 11  # DistributedSampler(even_divisible): ceil(41 / 4) per rank
    with pytest.raises(InputError, match=r"train: has 3 image\(s\) for 4 process\(es\)"):
        fit_batch_size(8, range(3))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(InputError, match="at least 2"):
        fit_batch_size(1, range(10))
    with pytest.raises(InputError, match="has 1 image"):
        fit_batch_size(8, range(1))


def test_train_small_set_and_errors_raised_inside_the_bundle(tiny_2d_folder, tmp_path, capsys):
    """A set smaller than the batch trains (one step per epoch); an error raised while MONAI builds a component
    (an empty training folder) reaches the user as one line, exit 2, not as MONAI's wrapped traceback."""
    from memscan.cli import main

    train, val = tiny_2d_folder(n=6, name="train"), tiny_2d_folder(n=4, name="val")
    run = tmp_path / "run"
    common = ["--dims", "2", "--epochs", "1", "--image-size", "32", "--arch", "resnet10", "--workers", "0",
              "--device", "cpu"]
    assert main(["train", "--train", str(train), "--val", str(val), "--out", str(run), "--batch-size", "16",
                 *common]) == 0
    assert (run / "model.pt").is_file() and latest_checkpoint(run).endswith("checkpoint_epoch=1.pt")
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    code = main(["train", "--train", str(tmp_path / "empty"), "--val", str(val), "--out", str(tmp_path / "r2"),
                 *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "empty" in err[0] and "no usable images" in err[0], err
    code = main(["train", "--train", str(train), "--val", str(val), "--out", str(tmp_path / "r3"), "--batch-size", "1",
                 *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--batch-size: needs at least 2 images per step" in err[0], err

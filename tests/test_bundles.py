"""Tests of the MONAI bundles (bundles/memscan_cxr_2d, bundles/memscan_knee_3d) the way model-zoo tests them:
ConfigWorkflow initialize → check_properties → run → finalize on tiny data, plus resume after a kill, a real
two-process gloo torchrun, and the inference config against embed_images."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from memscan.data import PreprocessConfig, load_image_set
from memscan.embed import embed_images
from memscan.networks import build_encoder, load_encoder_checkpoint
from memscan.training import bundle_dir

TINY = {2: {"image_size": 32, "arch": "resnet10", "batch_size": 4},
        3: {"image_size": 16, "arch": "resnet10", "batch_size": 3}}
REQUIRED_FILES = ["configs/metadata.json", "configs/train.json", "configs/multi_gpu_train.json",
                  "configs/inference.json", "configs/logging.conf", "docs/README.md", "LICENSE", "models"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture
def dataset(tmp_path, tiny_2d_folder, tiny_3d_folder):
    def make(dims: int, n_train: int = 8, n_val: int = 4) -> Path:
        root = tmp_path / f"data{dims}d"
        factory = tiny_2d_folder if dims == 2 else tiny_3d_folder
        size = (40, 36) if dims == 2 else (18, 18, 17)
        for split, n in (("train", n_train), ("val", n_val)):
            folder = factory(n=n, size=size, name=f"{dims}d_{split}")
            folder.rename(root / split) if root.exists() else (root.mkdir(), folder.rename(root / split))
        return root

    return make


def _train_workflow(dims: int, data: Path, out: Path, files: list[str] | None = None, **extra) -> ConfigWorkflow:
    b = bundle_dir(dims)
    config = files or [str(b / "configs" / "train.json")]
    overrides = {"dataset_dir": str(data), "max_epochs": 1, "num_workers": 0, "ckpt_dir": str(out),
                 "output_dir": str(out / "logs"), **TINY[dims], **extra}
    return ConfigWorkflow(config_file=config if len(config) > 1 else config[0], workflow_type="train",
                          logging_file=False, **overrides)


def test_train_without_tensorboard(dataset, tmp_path, monkeypatch, caplog):
    """tensorboard is an optional extra: a plain install trains with console logs and one warning, no error."""
    from memscan import training

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    training._tensorboard_installed.cache_clear()
    try:
        out = tmp_path / "run"
        workflow = _train_workflow(2, dataset(2), out)
        with caplog.at_level("WARNING", logger="memscan.training"):
            workflow.initialize()
            workflow.run()
        workflow.finalize()
        assert (out / "model.pt").is_file()
        assert not (out / "logs").exists() or not any((out / "logs").iterdir())
        assert sum("tensorboard package is not installed" in r.getMessage() for r in caplog.records) == 1
    finally:
        training._tensorboard_installed.cache_clear()


@pytest.mark.parametrize("dims", [2, 3])
def test_bundle_layout_and_metadata(dims):
    b = bundle_dir(dims)
    for rel in REQUIRED_FILES:
        assert (b / rel).exists(), rel
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"):
        assert key in meta, key
    # the schema check of monai.bundle.verify_metadata downloads its JSON schema: not possible offline, so the
    # fields above are checked here instead; the network's output size is checked the way verify_net_in_out does
    fmt = meta["network_data_format"]
    cfg = json.loads((b / "configs" / "train.json").read_text())
    net = build_encoder(dims, cfg["arch"], cfg["embedding_dim"], fmt["inputs"]["image"]["num_channels"]).eval()
    with torch.no_grad():
        out = net(torch.rand(1, fmt["inputs"]["image"]["num_channels"], *([64] * dims)))
    assert out.shape[1] == fmt["outputs"]["pred"]["num_channels"] == cfg["embedding_dim"]
    assert list(fmt["inputs"]["image"]["spatial_shape"]) == list(cfg["image_size"])


@pytest.mark.parametrize("dims", [2, 3])
def test_train_then_infer_with_config_workflow(dims, dataset, tmp_path):
    data, out = dataset(dims), tmp_path / "run"
    workflow = _train_workflow(dims, data, out)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.bundle_root == str(bundle_dir(dims))  # resolved from the config file, not the cwd
    workflow.run()
    workflow.finalize()
    metrics = workflow.evaluator.state.metrics
    for key in ("val_loss", "val_positive_similarity", "val_negative_similarity", "val_nearest_negative_similarity"):
        assert np.isfinite(metrics[key]), key
    assert (out / "model.pt").is_file() and (out / "checkpoint_epoch=1.pt").is_file()
    assert any((out / "logs").iterdir())  # TensorBoard events (the test extra installs tensorboard)

    # inference config: embeddings of the validation images with the best checkpoint, written with a file list
    b = bundle_dir(dims)
    emb_file = tmp_path / "emb" / "val.npy"
    infer = ConfigWorkflow(config_file=str(b / "configs" / "inference.json"), workflow_type="infer",
                           logging_file=False, dataset_dir=str(data / "val"), ckpt_path=str(out / "model.pt"),
                           output_file=str(emb_file), num_workers=0, batch_size=3,
                           image_size=TINY[dims]["image_size"], arch="resnet10")
    infer.initialize()
    assert infer.check_properties() == []
    infer.run()
    infer.finalize()
    emb = np.load(emb_file)
    records = load_image_set(data / "val", "val").records
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    assert emb.shape == (len(records), meta["network_data_format"]["outputs"]["pred"]["num_channels"])
    files = [r["image"] for r in csv.DictReader(open(emb_file.with_name("val.files.csv")))]
    assert files == [r["image"] for r in records]
    # one implementation: the Python API gives the same rows
    cfg = json.loads((b / "configs" / "train.json").read_text())
    net = load_encoder_checkpoint(build_encoder(dims, "resnet10", cfg["embedding_dim"]), out / "model.pt")
    pre = PreprocessConfig(spatial_dims=dims, spatial_size=TINY[dims]["image_size"],
                           crop_pad_size=cfg["crop_pad_size"], resize=cfg["resize"])
    np.testing.assert_allclose(embed_images(net, records, pre, device="cpu", batch_size=2), emb, rtol=1e-4, atol=1e-5)


def test_resume_after_a_kill_mid_epoch(dataset, tmp_path):
    data = dataset(2, n_train=4, n_val=2)

    def run(out: Path, kill_at: int | None = None) -> list[int]:
        workflow = _train_workflow(2, data, out, max_epochs=2, batch_size=2)
        workflow.initialize()
        epochs: list[int] = []
        workflow.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
        if kill_at is not None:
            def kill(engine):
                if engine.state.iteration == kill_at:
                    raise KeyboardInterrupt("killed")  # like Ctrl-C in the middle of epoch 2
            workflow.trainer.add_event_handler(Events.ITERATION_COMPLETED, kill)
        try:
            workflow.run()
        except (KeyboardInterrupt, RuntimeError) as err:
            assert "killed" in repr(err) or "killed" in repr(err.__cause__)
        workflow.finalize()
        return epochs

    assert run(tmp_path / "full") == [1, 2]
    assert run(tmp_path / "killed", kill_at=3) == [1, 2]  # 2 iterations per epoch: killed in epoch 2
    assert not (tmp_path / "killed" / "checkpoint_epoch=2.pt").exists()
    assert run(tmp_path / "killed") == [2]  # resumed: epoch 1 is not repeated
    full = torch.load(tmp_path / "full" / "checkpoint_epoch=2.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "checkpoint_epoch=2.pt", weights_only=True)
    assert resumed["trainer"]["iteration"] == full["trainer"]["iteration"] == 4
    # optimiser, scheduler and RNG restored: the resumed run ends with the uninterrupted run's weights
    for key, value in full["network"].items():
        torch.testing.assert_close(resumed["network"][key], value, msg=key)
    torch.testing.assert_close(resumed["lr_scheduler"]["_last_lr"][0], full["lr_scheduler"]["_last_lr"][0])
    assert resumed["best"]["saved"] and (tmp_path / "killed" / "model.pt").is_file()


def test_two_process_gloo_torchrun(dataset, tmp_path):
    data, out = dataset(2, n_train=8, n_val=4), tmp_path / "ddp"
    b = bundle_dir(2)
    configs = f"['{b / 'configs' / 'train.json'}','{b / 'configs' / 'multi_gpu_train.json'}']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", configs, "--dataset_dir", str(data), "--max_epochs", "1",
           "--num_workers", "0", "--ckpt_dir", str(out), "--output_dir", str(out / "logs"), "--arch", "resnet10",
           "--image_size", "32", "--batch_size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint_epoch=1.pt", weights_only=True)
    # 8 training images split over 2 ranks by the DistributedSampler, 2 per step: 2 iterations per rank
    assert ckpt["trainer"]["iteration"] == 2
    assert not any(k.startswith("module.") for k in ckpt["network"])  # saved unwrapped from DDP
    load_encoder_checkpoint(build_encoder(2, "resnet10", 128), out / "model.pt")

"""Training throughput: memscan's bundle trainer against a re-statement of the seed's training loop.

Side by side in one run, on the CPU, with the same network, image size, batch, loss and augmentations:

- ``seed``: the seed's loop — a ``torch.utils.data.Dataset`` that decodes and preprocesses each file on every
  step, per-sample view augmentation, ``DataLoader(num_workers=0)``, a plain fp32 Python training loop;
- ``memscan``: ``bundles/memscan_cxr_2d/configs/train.json`` run through ``monai.bundle.ConfigWorkflow`` (the same
  path as ``python -m monai.bundle run`` and ``memscan train``): decode + preprocess cached once
  (``CacheDataset``), augmentation in loader workers, ``SupervisedTrainer``; also with ``cpu_bf16`` +
  ``channels_last`` (bfloat16 autocast, for CPUs with AMX / AVX-512 BF16).

Throughput is images per second (each image gives two views) over the timed steps after one warm-up step; the
one-off cache fill is reported separately. With a CUDA GPU, the paper presets are also timed with AMP and
channels_last (images/s and peak memory); otherwise that part prints ``skipped: no GPU``.

Run: ``nice -n 10 python benchmarks/bench_training.py`` (about 10 minutes on 2 cores). Writes nothing but stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memscan.data import PreprocessConfig, load_image_set, preprocess_transforms, view_transforms
from memscan.networks import build_encoder
from memscan.training import NTXentLoss, bundle_dir

REAL_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "cxr"


def _make_data(root: Path, n_train: int, dims: int, size: tuple[int, ...]) -> Path:
    """``root/train`` (real chest X-rays when available, else generated) and a 2-image ``root/val``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    real = sorted(REAL_CXR.glob("*.jp*g")) if dims == 2 and REAL_CXR.is_dir() else []
    for split, n in (("train", n_train), ("val", 2)):
        for i in range(n):
            if dims == 2 and real:
                shutil.copy(real[(i + (n_train if split == "val" else 0)) % len(real)], root / split / f"{i}.jpeg")
            elif dims == 2:
                Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(root / split / f"{i}.png")
            else:
                import nibabel as nib

                nib.save(nib.Nifti1Image(rng.random(size).astype(np.float32), np.eye(4)), str(root / split / f"{i}.nii.gz"))
    return root


class SeedDataset(torch.utils.data.Dataset):
    """The seed's dataset: every ``__getitem__`` decodes the file, preprocesses it and draws two views."""

    def __init__(self, records: list[dict], cfg: PreprocessConfig) -> None:
        self.records, self.pre, self.views = records, preprocess_transforms(cfg), view_transforms(cfg, "paper")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.views(self.pre(dict(self.records[i])))
        return torch.as_tensor(d["view1"]), torch.as_tensor(d["view2"])


def seed_loop(data: Path, cfg: PreprocessConfig, arch: str, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    records = load_image_set(data / "train", "train").records
    loader = torch.utils.data.DataLoader(SeedDataset(records, cfg), batch_size=batch, shuffle=True, num_workers=0,
                                         drop_last=True)
    net = build_encoder(cfg.spatial_dims, arch, 128).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = NTXentLoss(0.07)
    times: list[float] = []
    while len(times) < steps + 1:
        for v1, v2 in loader:
            opt.zero_grad()
            loss = loss_fn(net(torch.cat([v1, v2])))
            loss.backward()
            opt.step()
            times.append(time.perf_counter())
            if len(times) == steps + 1:
                break
    return {"images_per_s": steps * batch / (times[-1] - times[0]), "cache_s": 0.0}


def memscan_run(data: Path, dims: int, image_size: list[int], arch: str, batch: int, steps: int, workers: int,
                out: Path, **extra) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    b = bundle_dir(dims)
    n_train = len(list((data / "train").iterdir()))
    per_epoch = n_train // batch
    overrides = {"dataset_dir": str(data), "arch": arch, "image_size": image_size, "batch_size": batch,
                 "num_workers": workers, "max_epochs": -(-(steps + 1) // per_epoch), "val_interval": 10**6,
                 "ckpt_dir": str(out), "output_dir": str(out / "logs"), "crop_pad_size": None, **extra}
    wf = ConfigWorkflow(config_file=str(b / "configs" / "train.json"), workflow_type="train", logging_file=False,
                        **overrides)
    wf.initialize()
    t0 = time.perf_counter()
    _ = wf.train_dataset  # builds the cache (decode + preprocess every file once)
    cache_s = time.perf_counter() - t0
    times: list[float] = []
    trainer = wf.trainer

    def tick(engine):
        times.append(time.perf_counter())
        if len(times) == steps + 1:
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, tick)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wf.run()
    wf.finalize()
    res = {"images_per_s": steps * batch / (times[-1] - times[0]), "cache_s": cache_s}
    if torch.cuda.is_available():
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method (after one warm-up step)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"bench_training  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
          f", threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    size = [args.image_size] * 2
    cfg = PreprocessConfig(spatial_dims=2, spatial_size=args.image_size, resize=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _make_data(tmp / "cxr", n_train=16, dims=2, size=(1024, 1024))
        print(f"CPU, 2D: {args.arch}, {args.image_size}², batch {args.batch_size} (x2 views), 128-d, "
              f"{args.steps} timed steps, data: 16 {'real chest X-ray JPEGs' if REAL_CXR.is_dir() else 'PNGs'}")
        rows = []
        seed = seed_loop(data, cfg, args.arch, args.batch_size, args.steps)
        rows.append(("seed loop (decode+augment per step, workers=0, fp32)", seed))
        ms = memscan_run(data, 2, size, args.arch, args.batch_size, args.steps, args.workers, tmp / "r1")
        rows.append((f"memscan bundle (cached, workers={args.workers}, fp32)", ms))
        fast = memscan_run(data, 2, size, args.arch, args.batch_size, args.steps, args.workers, tmp / "r2",
                           cpu_bf16=True, channels_last=True)
        rows.append((f"memscan bundle (cached, workers={args.workers}, cpu_bf16 + channels_last)", fast))
        base = seed["images_per_s"]
        print(f"{'method':<66} {'images/s':>9} {'ratio':>7} {'cache fill s':>13}")
        for name, r in rows:
            print(f"{name:<66} {r['images_per_s']:>9.2f} {r['images_per_s'] / base:>6.2f}x {r['cache_s']:>13.1f}")
        print("target: memscan >= 3x the seed loop")

        if not torch.cuda.is_available():
            print("GPU (paper presets, AMP, channels_last): skipped: no GPU")
            return
        from memscan.training import preset

        print(f"GPU: {torch.cuda.get_device_name()} (paper presets, AMP, channels_last)")
        for dims, vol in ((2, (1024, 1024)), (3, (40, 256, 256))):
            p = preset("paper", dims)
            gdata = _make_data(tmp / f"gpu{dims}", n_train=3 * p["batch_size"], dims=dims, size=vol)
            r = memscan_run(gdata, dims, p["image_size"], p["arch"], p["batch_size"], 10, 8, tmp / f"g{dims}",
                            amp=True, channels_last=True, crop_pad_size=p["crop_pad_size"], resize=p["resize"],
                            embedding_dim=p["embedding_dim"])
            print(f"  {dims}D {p['arch']} {'x'.join(map(str, p['image_size']))} batch {p['batch_size']}: "
                  f"{r['images_per_s']:.1f} images/s, peak {r['peak_gib']:.1f} GiB")
        print(json.dumps({"note": "GPU numbers from the run above"}))


if __name__ == "__main__":
    main()

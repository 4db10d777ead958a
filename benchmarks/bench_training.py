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
    # (real files are reused under new names when more images than files are asked for)
    for split, n in (("train", n_train), ("val", 2)):
        for i in range(n):
            if dims == 2 and real:
                k = i + (n_train if split == "val" else 0)
                src = real[k % len(real)]
                if k < len(real):
                    shutil.copy(src, root / split / f"{i}.jpeg")
                else:  # more images than real files: a shifted crop, so the data layer does not drop duplicates
                    img = Image.open(src)
                    shift = 8 * (k // len(real))
                    img.crop((shift, shift, img.width, img.height)).save(root / split / f"{i}.jpeg", quality=95)
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
        return torch.as_tensor(d["view1"]).as_subclass(torch.Tensor), torch.as_tensor(d["view2"]).as_subclass(torch.Tensor)


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
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (after one warm-up step)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"bench_training  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
          f", threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    size = [args.image_size] * 2
    cfg = PreprocessConfig(spatial_dims=2, spatial_size=args.image_size, resize=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_train = args.batch_size * (args.steps + 2)  # every timed step inside the first epoch
        data = _make_data(tmp / "cxr", n_train=n_train, dims=2, size=(1024, 1024))
        print(f"CPU, 2D: {args.arch}, {args.image_size}², batch {args.batch_size} (x2 views), 128-d, "
              f"{args.steps} timed steps, data: {n_train} {'real chest X-ray JPEGs' if REAL_CXR.is_dir() else 'PNGs'}")
        methods = {
            "seed loop (decode+augment per step, workers=0, fp32)":
                lambda r: seed_loop(data, cfg, args.arch, args.batch_size, args.steps),
            f"memscan bundle (cached, workers={args.workers}, fp32)":
                lambda r: memscan_run(data, 2, size, args.arch, args.batch_size, args.steps, args.workers,
                                      tmp / f"a{r}"),
            f"memscan bundle (cached, workers={args.workers}, cpu_bf16 + channels_last)":
                lambda r: memscan_run(data, 2, size, args.arch, args.batch_size, args.steps, args.workers,
                                      tmp / f"b{r}", cpu_bf16=True, channels_last=True),
        }
        # other jobs share this machine: run the methods in interleaved rounds and report medians
        results: dict[str, list[dict]] = {name: [] for name in methods}
        for r in range(args.rounds):
            for name, fn in methods.items():
                results[name].append(fn(r))
            print(f"  round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}: "
                  + ", ".join(f"{v[-1]['images_per_s']:.2f}" for v in results.values()), flush=True)
        med = {name: float(np.median([x["images_per_s"] for x in v])) for name, v in results.items()}
        base = med[next(iter(methods))]
        print(f"{'method (median of rounds)':<66} {'images/s':>9} {'ratio':>7} {'cache fill s':>13}")
        for name, v in results.items():
            cache = float(np.median([x["cache_s"] for x in v]))
            print(f"{name:<66} {med[name]:>9.2f} {med[name] / base:>6.2f}x {cache:>13.1f}")
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

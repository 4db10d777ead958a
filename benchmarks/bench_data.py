"""Benchmark of the data layer, side by side in one run on the same files and CPU.

1. **Validation** (``load_image_set``: every file decoded once, NaN/constant checks, pixel hash) with 1 thread
   against the default pool of threads.
2. **Training epochs** over ``Compose([preprocess, views])``: a plain MONAI ``Dataset`` (decodes every file every
   epoch) against :func:`memscan.data.make_dataset` (``CacheDataset``: decoded once, views stay random), and the
   on-disk ``PersistentDataset`` on a second run (what a resumed job sees).

Usage::

    nice python benchmarks/bench_data.py [--n 200] [--size 512] [--epochs 3] [--out docs/benchmarks/data.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _images(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05) * 200 + rng.normal(0, 10, (size, size))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:04d}.png")


def _epochs(ds, epochs: int) -> list[float]:
    from monai.data import DataLoader

    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for _batch in DataLoader(ds, batch_size=16, num_workers=0):
            pass
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from monai.data import Dataset
    from monai.transforms import Compose

    from memscan.data import PreprocessConfig, load_image_set, make_dataset, preprocess_transforms, view_transforms

    cpu = platform.processor() or platform.machine()
    lines = [f"memscan data-layer benchmark: {args.n} PNGs {args.size}², {os.cpu_count()} CPU(s), {cpu}"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        _images(folder, args.n, args.size)

        load_image_set(folder, "warm-up", workers=1)  # imports, reader set-up and the OS file cache, untimed
        t = time.perf_counter()
        one = load_image_set(folder, "train", workers=1)
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        pool = load_image_set(folder, "train")
        t_pool = time.perf_counter() - t
        assert one.hashes == pool.hashes
        lines.append(
            f"validation, 1 thread:       {t_one:6.2f} s  ({args.n / t_one:6.1f} images/s)\n"
            f"validation, default pool:   {t_pool:6.2f} s  ({args.n / t_pool:6.1f} images/s)  "
            f"speed-up {t_one / t_pool:.2f}x"
        )

        cfg = PreprocessConfig(spatial_dims=2, spatial_size=128)
        chain = Compose([preprocess_transforms(cfg), view_transforms(cfg, "paper")])
        plain = _epochs(Dataset(pool.records, chain), args.epochs)
        t = time.perf_counter()
        cached_ds = make_dataset(pool.records, chain)
        t_fill = time.perf_counter() - t
        cached = _epochs(cached_ds, args.epochs)
        cache_dir = Path(tmp) / "cache"
        _epochs(make_dataset(pool.records, chain, cache_dir=cache_dir), 1)
        persistent = _epochs(make_dataset(pool.records, chain, cache_dir=cache_dir), args.epochs)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        lines.append(
            f"epoch, plain Dataset:        {mean(plain):6.2f} s (mean of {args.epochs})\n"
            f"epoch, CacheDataset:         {mean(cached):6.2f} s (+{t_fill:.2f} s one-off fill)  "
            f"speed-up {mean(plain) / mean(cached):.2f}x\n"
            f"epoch, PersistentDataset:    {mean(persistent):6.2f} s (warm on-disk cache)  "
            f"speed-up {mean(plain) / mean(persistent):.2f}x"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Benchmark of the audit: embedding throughput against the seed's way, and end-to-end audit time on the demo data.

Side by side in one run, same encoder (memscan's default 2D preset: ResNet-18, 128-d), same images, same CPU:

* **seed's way** — what the paper's scripts do: one image at a time, decoded with PIL, min-max normalised in NumPy,
  resized with torch, one forward pass per image, no DataLoader;
* **memscan** — :func:`memscan.embed.embed_images`: MONAI preprocessing through a DataLoader, batched forward passes
  under ``inference_mode`` (AMP and pinned memory on a GPU);
* **memscan, cached** — the same call again with its embedding cache (what a resumed or repeated audit does).

Then the end-to-end time of ``memscan demo`` (build inputs, train the encoder, audit, report) and of a repeated audit
with the trained checkpoint and a warm embedding cache.

Usage::

    nice python benchmarks/bench_audit.py [--n 96] [--size 256] [--batch-size 32] [--out docs/benchmarks/audit.txt]

Target (issue 5): memscan's embedding ≥5× the seed's throughput.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _images(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` distinct 8-bit PNGs of ``2*size`` pixels: demo-data slices when present, else smooth phantoms."""
    sources: list[np.ndarray] = []
    try:
        from memscan.data import demo_data_dir

        for p in sorted(demo_data_dir().rglob("*")):
            if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
                sources.append(np.asarray(Image.open(p).convert("L")))
    except Exception:  # noqa: BLE001 — the benchmark falls back to phantoms when no demo data is installed
        sources = []
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    side = 2 * size
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij"))
    for i in range(n):
        if sources:
            base = np.asarray(Image.fromarray(sources[i % len(sources)]).resize((side, side)), np.float64) / 255.0
        else:
            base = np.zeros((side, side))
            for _ in range(5):
                c = rng.uniform(-0.6, 0.6, 2)[:, None, None]
                base += rng.uniform(0.3, 1) * np.exp(-((grid - c) ** 2).sum(0) / rng.uniform(0.05, 0.3))
        img = base + 0.02 * rng.random((side, side))  # every file distinct (no cache hit, no duplicate)
        img = (img - img.min()) / (img.max() - img.min())
        path = folder / f"img_{i:04d}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def seed_way(network: torch.nn.Module, paths: list[Path], size: int) -> np.ndarray:
    """The seed's loop: per image, decode, NumPy min-max, resize, one forward pass."""
    out = []
    network.eval()
    with torch.no_grad():
        for p in paths:
            arr = np.asarray(Image.open(p).convert("L"), dtype=np.float32)
            arr = (arr - arr.min()) / (arr.max() - arr.min())
            x = torch.from_numpy(arr)[None, None]
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out.append(network(x).numpy()[0])
    return np.stack(out)


def _row_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def bench_embedding(n: int, size: int, batch_size: int, workers: int, tmp: Path) -> list[str]:
    from memscan.data import PreprocessConfig
    from memscan.embed import configured_preprocess, embed_images
    from memscan.networks import build_encoder

    paths = _images(tmp / "images", n, size)
    torch.manual_seed(0)
    net = build_encoder(2, "resnet18", 128).eval()
    preprocess = configured_preprocess(PreprocessConfig(spatial_dims=2, spatial_size=size))
    records = [{"image": str(p)} for p in paths]
    # warm-up both paths on a few images (allocator, MKL-DNN kernels)
    seed_way(net, paths[:2], size)
    embed_images(net, records[:2], preprocess, batch_size=2, device="cpu")

    t0 = time.perf_counter()
    seed = seed_way(net, paths, size)
    t_seed = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = embed_images(net, records, preprocess, batch_size=batch_size, device="cpu", num_workers=workers)
    t_ours = time.perf_counter() - t0
    cache = tmp / "cache"
    embed_images(net, records, preprocess, batch_size=batch_size, device="cpu", num_workers=workers, cache_dir=cache)
    t0 = time.perf_counter()
    cached = embed_images(net, records, preprocess, batch_size=batch_size, device="cpu", num_workers=workers,
                          cache_dir=cache)
    t_cached = time.perf_counter() - t0
    agree = _row_corr(seed, ours)
    assert np.allclose(cached, ours, atol=1e-5)
    return [
        f"embedding throughput: {n} PNGs of {2 * size}² → {size}², ResNet-18 (128-d), CPU, batch {batch_size}, "
        f"{workers} loader worker(s)",
        f"  seed's way (per image, NumPy min-max, no DataLoader): {t_seed:7.2f} s  {n / t_seed:7.1f} img/s",
        f"  memscan embed_images (batched, MONAI DataLoader)     : {t_ours:7.2f} s  {n / t_ours:7.1f} img/s"
        f"   → {t_seed / t_ours:5.2f}× the seed",
        f"  memscan embed_images, cached rerun (resume)          : {t_cached:7.2f} s  {n / t_cached:7.1f} img/s"
        f"   → {t_seed / t_cached:5.1f}× the seed",
        f"  agreement seed vs memscan embeddings (row Pearson r): min {agree.min():.4f}, mean {agree.mean():.4f} "
        f"(resize implementations differ slightly)",
        f"  target ≥5× (uncached): {'MET' if t_seed / t_ours >= 5 else 'NOT MET on this CPU'}",
    ]


def bench_demo(tmp: Path, dims: int) -> list[str]:
    from memscan.audit import audit, run_demo

    t0 = time.perf_counter()
    result = run_demo(tmp / f"demo{dims}d", dims=dims)
    t_demo = time.perf_counter() - t0
    res = result.audit
    prov = res.summary["provenance"]
    t0 = time.perf_counter()
    audit(result.inputs.train, result.inputs.val, {"synthetic": result.inputs.synthetic}, out_dir=res.out_dir,
          checkpoint=res.checkpoint, overwrite=True, image_size=prov["config"]["image_size"],
          train_overrides={"arch": prov["config"]["arch"], "embedding_dim": prov["config"]["embedding_dim"]},
          device="cpu", subject_regex=result.inputs.subject_regex)
    t_again = time.perf_counter() - t0
    n = {k: v["n_files"] for k, v in prov["inputs"].items()}
    return [
        f"end-to-end `memscan demo --dims {dims}` ({n}): {t_demo:6.1f} s "
        f"(build inputs + train encoder + embed + match + report); planted copies caught "
        f"{result.n_copies_caught}/{result.n_copies_planted}, unseen images flagged "
        f"{result.n_unseen_flagged}/{result.n_unseen}",
        f"  repeated audit with the trained checkpoint and warm embedding cache: {t_again:6.1f} s",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=96, help="images for the throughput test")
    parser.add_argument("--size", type=int, default=256, help="encoder input size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for memscan")
    parser.add_argument("--dims", type=int, nargs="*", default=[2, 3], help="demo dimensionalities to time")
    parser.add_argument("--out", default=None, help="also write the report here (e.g. docs/benchmarks/audit.txt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    lines = [
        "memscan audit benchmark (benchmarks/bench_audit.py)",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, GPU: "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start "
        f"{os.getloadavg()[0]:.2f} (other jobs on the same cores slow both sides of each ratio)",
        "",
    ]
    tmp = Path(tempfile.mkdtemp(prefix="memscan-bench-"))
    try:
        lines += bench_embedding(args.n, args.size, args.batch_size, args.workers, tmp)
        lines.append("")
        for dims in args.dims:
            lines += bench_demo(tmp, dims)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real memorizing generator: a small MONAI DDPM trained on a handful of real slices, then sampled.

``train_generator`` fits ``DiffusionModelUNet`` with ``DDPMScheduler`` through ``DiffusionInferer`` on ``n_train``
slices (``size``²) until the loss is low (tiny training sets are memorized); ``sample_generator`` draws samples with
DDIM (``DDIMScheduler``, fewer steps, same trained model). ``run.py`` audits the samples: memscan-style copy flags
versus pixel-level nearest neighbours by SSIM (``monai.metrics.SSIMMetric``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

__all__ = ["build_unet", "train_generator", "sample_generator"]


def build_unet() -> DiffusionModelUNet:
    """A small 2D diffusion U-Net for 32² grey-scale slices (MONAI attention blocks need ``einops``)."""
    return DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64, 64),
                              attention_levels=(False, False, True), num_res_blocks=1, num_head_channels=32,
                              norm_num_groups=16)


def train_generator(images: np.ndarray, out_path: Path, *, max_seconds: float = 900.0, max_steps: int = 20000,
                    batch_size: int = 16, lr: float = 5e-4, seed: int = 0, resume: dict | None = None,
                    log=print) -> dict:
    """Train the DDPM on ``images`` ([n, 1, H, W] in [0, 1]) for at most ``max_seconds`` / ``max_steps``.

    The state_dict is written atomically to ``out_path``; returns a small training record (steps, seconds, loss).
    With ``resume`` (a previous record) training continues from the weights in ``out_path`` and the record adds up.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + (resume or {}).get("steps", 0))
    net = build_unet()
    if resume:
        net.load_state_dict(torch.load(out_path, weights_only=True))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(scheduler)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x0 = torch.as_tensor(images, dtype=torch.float32) * 2.0 - 1.0
    n = len(x0)
    start, cpu0, step, ema = time.time(), time.process_time(), 0, None
    net.train()
    while step < max_steps and time.time() - start < max_seconds:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x = x0[idx]
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, scheduler.num_train_timesteps, (len(x),), generator=gen).long()
        pred = inferer(inputs=x, diffusion_model=net, noise=noise, timesteps=t)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.99 * ema + 0.01 * loss.item()
        step += 1
        if step % 500 == 0:
            log(f"  generator step {step}: loss(ema) {ema:.4f}, {time.time() - start:.0f}s")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, out_path)
    prev = resume or {}
    return {"steps": step + prev.get("steps", 0), "seconds": round(time.time() - start + prev.get("seconds", 0), 1),
            "cpu_seconds": round(time.process_time() - cpu0 + prev.get("cpu_seconds", 0), 1),
            "loss_ema": round(float(ema), 5), "n_train": n, "size": int(images.shape[-1])}


@torch.no_grad()
def sample_generator(ckpt: Path, n: int, size: int, *, steps: int = 100, seed: int = 1) -> np.ndarray:
    """Draw ``n`` samples ([n, 1, size, size] in [0, 1]) with DDIM in ``steps`` steps."""
    net = build_unet()
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    net.eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(num_inference_steps=steps)
    inferer = DiffusionInferer(scheduler)
    noise = torch.randn((n, 1, size, size), generator=torch.Generator().manual_seed(seed))
    out = inferer.sample(input_noise=noise, diffusion_model=net, scheduler=scheduler, verbose=False)
    return ((out.clamp(-1, 1) + 1) / 2).numpy().astype(np.float32)


def generator_training_set(mri_groups: dict, subject: str = "colin27", n: int = 16, size: int = 32) -> np.ndarray:
    """``n`` evenly spaced axial slices of one subject, area-downsampled to ``size``² (the generator's data)."""
    from monai.transforms import Resize

    slices = mri_groups[subject]
    idx = np.linspace(2, len(slices) - 1, n).round().astype(int)
    resize = Resize(spatial_size=(size, size), mode="area")
    return np.stack([np.asarray(resize(torch.as_tensor(slices[i]))) for i in idx]).astype(np.float32)


if __name__ == "__main__":
    import argparse
    import json

    from build import load_cases

    parser = argparse.ArgumentParser(description="train the benchmark's memorizing DDPM")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/memscan_detection_cache"))
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--resume", action="store_true", help="continue from <cache>/ddpm.pt")
    parser.add_argument("--batch-size", type=int, default=16)
    a = parser.parse_args()
    torch.set_num_threads(1)
    data = generator_training_set(load_cases(a.cache)["mri_t1_2d"]["groups"])
    prev = json.loads((a.cache / "ddpm.json").read_text()) if a.resume else None
    record = train_generator(data, a.cache / "ddpm.pt", max_seconds=a.max_seconds, resume=prev,
                             batch_size=a.batch_size)
    (a.cache / "ddpm.json").write_text(json.dumps(record))
    print(record)

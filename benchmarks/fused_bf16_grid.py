"""Correctness sweep of memscan's fused bfloat16 convolutions (``memscan.networks.FusedConv``) against float32.

oneDNN computes a few bfloat16 convolution shapes wrongly (pytorch/pytorch#169688); ``memscan.training.
bf16_conv_is_unsafe`` names them and memscan runs them in float32. Its rules were found on ATen's convolution; the
fused kernel (``torch.ops.mkldnn._convolution_pointwise``, with ReLU and with a residual addition) is a different
oneDNN primitive, so this sweep checks that on every shape the rules call safe it agrees with float32 (largest error
relative to the output's largest magnitude <= 0.05; bfloat16 rounding gives ~1e-2, the bug gives order 1 or NaN).
Each shape runs twice (the wrong values depend on what the heap held).

Run: ``nice python benchmarks/fused_bf16_grid.py [--sample N]`` (the full grid takes ~3 min on 2 cores); the latest
output is appended to ``docs/benchmarks/cpu_bf16.txt``.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import time

import torch

from memscan.networks import FusedConv, fusion_available
from memscan.training import bf16_conv_is_unsafe


def shapes() -> list[tuple]:
    """(dims, in channels, out channels, kernel, stride, spatial size) over 2D and 3D."""
    out = []
    for dims in (2, 3):
        for cin, cout in ((1, 8), (3, 16), (16, 32), (24, 40), (64, 64), (130, 64)):
            for k in (1, 3, 5, 7):
                for s in (1, 2, 3):
                    for spatial in itertools.product(*[(1, 2, 3, 5, 8, 13)] * dims):
                        out.append((dims, cin, cout, k, s, spatial))
    return out


def sweep(cases: list[tuple], tolerance: float = 0.05) -> tuple[int, list[tuple]]:
    """Run the fused kernel on every safe case; returns (calls, wrong cases with their error)."""
    calls, wrong = 0, []
    with torch.inference_mode():
        for dims, cin, cout, k, s, spatial in cases:
            p = k // 2
            if any((x + 2 * p - k) // s + 1 < 1 for x in spatial):
                continue
            conv = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(cin, cout, k, s, p)
            fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
            x = torch.randn(2, cin, *spatial).contiguous(memory_format=fmt)
            if bf16_conv_is_unsafe(x.shape, (k,) * dims, s, p):
                continue
            plain = conv(x)
            for residual in (False, True):
                other = torch.randn_like(plain) if residual else None
                ref = torch.relu(plain + other) if residual else torch.relu(plain)
                fused = FusedConv(conv, relu=True, residual=residual, dtype=torch.bfloat16)
                for _ in range(2):
                    y = fused(x, other).float()
                    calls += 1
                    err = float((y - ref).abs().max() / (ref.abs().max() + 1e-6)) if torch.isfinite(y).all() \
                        else float("inf")
                    if err > tolerance:
                        wrong.append((dims, cin, cout, k, s, spatial, residual, err))
                        break
    return calls, wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=0, help="random sample of this many shapes (0: all)")
    args = parser.parse_args()
    if not fusion_available():
        print("this torch build has no oneDNN fused convolution: nothing to check")
        return
    torch.manual_seed(0)
    cases = shapes()
    if args.sample:
        cases = random.Random(0).sample(cases, min(args.sample, len(cases)))
    start = time.perf_counter()
    calls, wrong = sweep(cases)
    print(f"fused bfloat16 convolution sweep  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"host: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{len(cases)} shapes, {calls} fused calls on the shapes bf16_conv_is_unsafe calls safe, "
          f"{time.perf_counter() - start:.0f} s: {len(wrong)} wrong")
    for case in wrong[:30]:
        print("  wrong:", case)


if __name__ == "__main__":
    main()

"""CPU bfloat16 autocast for the 3D encoder: speed and correctness against float32, side by side in one run.

For each case (the 3D default preset and the 3D demo's encoder; the 2D default preset for reference) one training
step (forward, NT-Xent, backward, Adam) is timed with ``memscan.training.AutocastInferer`` three ways, on copies of
one network with one batch:

- ``fp32``: autocast off;
- ``bf16 raw``: plain ``torch.autocast`` (what the inferer did before the oneDNN guard);
- ``bf16``: the inferer now (``Float32UnsafeConvs`` runs the convolutions oneDNN gets wrong in float32).

It also reports the forward pass's largest error against float32 (relative to the output's largest magnitude):
bf16 rounding gives about 1e-2; the oneDNN bug (pytorch/pytorch#169688) gives values of order 1 to 1e37, or NaN.

Run: ``nice -n 10 python benchmarks/bench_cpu_bf16.py`` (a few minutes on 2 cores). Writes nothing but stdout;
the latest output is committed as ``docs/benchmarks/cpu_bf16.txt``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

from memscan.networks import build_encoder
from memscan.training import PRESETS, AutocastInferer, NTXentLoss, _native_low_precision

CASES = {
    "3D default preset": dict(dims=3, arch="resnet18", dim=32, size=PRESETS["default"][3]["image_size"], batch=8),
    "3D demo encoder": dict(dims=3, arch="resnet10", dim=32, size=[64, 64, 16], batch=4),
    "2D default preset": dict(dims=2, arch="resnet18", dim=128, size=PRESETS["default"][2]["image_size"], batch=32),
}


class _RawAutocast(AutocastInferer):
    """The inferer without the oneDNN guard (plain ``torch.autocast``), for comparison only."""

    def __call__(self, inputs, network, *args, **kwargs):  # type: ignore[no-untyped-def]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return network(inputs, *args, **kwargs).float()


def _bench(case: dict, repeats: int) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    base = build_encoder(case["dims"], case["arch"], case["dim"])
    x = torch.rand(2 * case["batch"], 1, *case["size"])
    modes = {"fp32": AutocastInferer(enabled=False), "bf16 raw": _RawAutocast(), "bf16": AutocastInferer(enabled=True)}
    loss_fn = NTXentLoss(0.1)
    nets = {m: copy.deepcopy(base) for m in modes}
    opts = {m: torch.optim.Adam(nets[m].parameters(), 1e-4) for m in modes}
    with torch.no_grad():
        ref = modes["fp32"](x, copy.deepcopy(base).eval())
    errors = {}
    for m, inferer in modes.items():
        with torch.no_grad():
            out = inferer(x, copy.deepcopy(base).eval())
        err = float((out - ref).abs().max() / ref.abs().max())
        errors[m] = err if torch.isfinite(out).all() else float("nan")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(repeats + 1):  # first round: warm-up (oneDNN primitive creation)
        for m, inferer in modes.items():
            start = time.perf_counter()
            loss = loss_fn(inferer(x, nets[m]))
            opts[m].zero_grad()
            loss.backward()
            opts[m].step()
            if rep:
                times[m].append(time.perf_counter() - start)
    return {m: (min(times[m]), errors[m]) for m in modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"native CPU bf16: {_native_low_precision('cpu')}; best of {args.repeats} steps after one warm-up")
    for name in args.cases:
        case = CASES[name]
        res = _bench(case, args.repeats)
        fp32 = res["fp32"][0]
        print(f"\n{name}: {case['arch']} {case['dims']}D, input {case['size']}, {case['batch']} images "
              f"({2 * case['batch']} views) per step")
        for m, (t, err) in res.items():
            print(f"  {m:9s} step {t:7.3f} s  speed-up vs fp32 {fp32 / t:5.2f}x  forward max error {err:.3g}")


if __name__ == "__main__":
    main()

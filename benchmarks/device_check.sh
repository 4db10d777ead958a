#!/usr/bin/env bash
# The checks that need a GPU, as one short script for a session lent a device machine (see the README's Limits):
#   1. the GPU tests (CUDA search == CPU search, for the correlation search and the alignment search),
#   2. issue 2's 112k x 112k (NIH ChestX-ray14 size) match on the GPU, target < 5 s,
#   3. issue 5's embedding throughput on the GPU against the seed's loop there, target >= 5x, and an end-to-end
#      audit with a checkpoint on 3 x 320 images there (the fused score's one-pass features on CUDA).
# Usage on the device machine, from the repository root, with memscan's dependencies importable (a CUDA torch is
# there; carry wheels of monai and the rest as the device README says):
#   OUT=/some/dir bash benchmarks/device_check.sh
# Writes $OUT/device_check.log; about 5 minutes on one H200.
set -u -o pipefail
OUT="${OUT:-/tmp/memscan-device}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
{
  echo "== device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__, 'gpu', torch.cuda.is_available())"
  echo "== 1. GPU tests"; timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_metrics.py tests/test_scoring.py -k gpu
  echo "== 2. metrics, 112k on the GPU"; timeout 300 python3 benchmarks/bench_metrics.py --gpu-only
  echo "== 3. embedding on the GPU"
  timeout 400 python3 benchmarks/bench_audit.py --device cuda --workers 2 --n 320 --repeats 2 --dims --scale 320
} 2>&1 | tee "$OUT/device_check.log"

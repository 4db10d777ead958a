"""memscan: does a generative model's synthetic data copy the patients it was trained on?

The pipeline reads left to right in the package's module names::

    memscan.data  ->  memscan.networks  ->  memscan.training  ->  memscan.embed  ->  memscan.metrics  ->  memscan.report
    (images)          (encoder)             (self-supervised)     (embeddings)      (matches, tau)       (tables, HTML)

``memscan.audit`` ties them together. Method: Dar et al., "Unconditional latent diffusion models memorize
patient imaging data" (Nature Biomedical Engineering, 2025).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "match", "MatchResult", "audit", "AuditResult", "build_encoder", "embed_images"]

# Public names resolved lazily so ``import memscan`` stays cheap (torch/MONAI load on first use).
_LAZY = {
    "match": "memscan.metrics",
    "MatchResult": "memscan.metrics",
    "audit": "memscan.audit",
    "AuditResult": "memscan.audit",
    "build_encoder": "memscan.networks",
    "embed_images": "memscan.embed",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memscan' has no attribute {name!r}")

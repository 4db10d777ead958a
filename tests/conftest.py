"""Shared test fixtures: tiny generated image folders (2D PNG, 3D NIfTI) any test module can reuse.

Factories (fixtures returning a callable)::

    folder = tiny_2d_folder(n=6, size=(32, 32), subjects=3)     # PNGs s{subject}_{i}_{folder}.png
    folder = tiny_3d_folder(n=4, size=(16, 16, 16), subjects=2)  # NIfTIs s{subject}_{i}_{folder}.nii.gz

Every image is distinct (seeded noise + a blob), non-constant and finite. Default subject ids (file stems) are unique
across folders; ``subject_regex=SUBJECT_REGEX`` gives the shared ids ``s0``, ``s1``, ... ``REAL_DATA`` points at the
shared real files when they exist (tests using it must skip otherwise; the ``real_data`` fixture does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

SUBJECT_REGEX = r"^(?P<subject>s\d+)_"
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
    """Factory writing ``n`` distinct 8-bit PNGs ``s{subject}_{i}_{folder}.png`` (subjects round-robin)."""
    counter = {"k": 0}

    def make(
        n: int = 6, size: Sequence[int] = (32, 32), subjects: int | None = None, name: str | None = None, seed: int = 0
    ) -> Path:
        counter["k"] += 1
        folder = tmp_path / (name or f"set2d_{counter['k']}")
        n_subj = subjects or n
        for i in range(n):
            arr = make_array(size, seed * 1000 + counter["k"] * 100 + i)
            write_png(folder / f"s{i % n_subj}_{i}_{folder.name}.png", arr)
        return folder

    return make


@pytest.fixture
def tiny_3d_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing ``n`` distinct float32 NIfTI volumes ``s{subject}_{i}_{folder}.nii.gz``."""
    counter = {"k": 0}

    def make(
        n: int = 4,
        size: Sequence[int] = (16, 16, 16),
        subjects: int | None = None,
        name: str | None = None,
        seed: int = 0,
    ) -> Path:
        counter["k"] += 1
        folder = tmp_path / (name or f"set3d_{counter['k']}")
        n_subj = subjects or n
        for i in range(n):
            arr = make_array(size, seed * 1000 + counter["k"] * 100 + i, dtype="float32")
            write_nifti(folder / f"s{i % n_subj}_{i}_{folder.name}.nii.gz", arr)
        return folder

    return make


@pytest.fixture
def real_data() -> Path:
    """The shared real images (``../shared/data/real``); skips the test when they are absent."""
    if not REAL_DATA.is_dir():
        pytest.skip("real data folder ../shared/data/real not present")
    return REAL_DATA


def write_dicom(
    path: Path,
    arr: np.ndarray,
    *,
    patient_id: str = "P1",
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    series_uid: str | None = None,
    position: Sequence[float] | None = None,
    multiframe: bool = False,
) -> Path:
    """Write a minimal valid DICOM file: uint16 grey 2D, 8-bit RGB for (rows, cols, 3), frames with ``multiframe``.

    ``position`` adds ImagePositionPatient/ImageOrientationPatient/PixelSpacing (a slice of a volume series).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    colour = arr.ndim == 3 and arr.shape[-1] == 3 and not multiframe
    arr = np.ascontiguousarray(arr.astype(np.uint8 if colour else np.uint16))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "OT"
    if multiframe:
        ds.NumberOfFrames = arr.shape[0]
    if colour:
        ds.Rows, ds.Columns = arr.shape[0], arr.shape[1]
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PhotometricInterpretation = "RGB"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    else:
        ds.Rows, ds.Columns = arr.shape[-2], arr.shape[-1]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if position is not None:
        ds.ImagePositionPatient = [float(p) for p in position]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 1.0
        ds.InstanceNumber = int(position[2]) + 1
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_dicom_series(folder: Path, vol: np.ndarray, patient_id: str = "P1") -> Path:
    """Write a (slices, rows, cols) volume as one DICOM series, one file per slice, in ``folder``."""
    from pydicom.uid import generate_uid

    uid = generate_uid()
    for z in range(vol.shape[0]):
        write_dicom(folder / f"slice{z:03d}.dcm", vol[z], patient_id=patient_id, series_uid=uid, position=(0, 0, z))
    return folder


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core CI machine, OpenMP threads waiting on each other dominate tiny nets."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

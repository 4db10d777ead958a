"""Every supported format through the same loader (memscan.data.readers + load_image_set)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memscan.data import PreprocessConfig, load_image_set, preprocess_transforms, probe_image
from memscan.data.readers import format_of, image_suffix, make_loader
from memscan.errors import InputError

from conftest import make_array, write_dicom, write_dicom_series, write_nifti, write_png


def _write_sitk(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)  # numpy (z, y, x)
    img.SetSpacing(tuple(float(s) for s in spacing[: arr.ndim]))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _write_tiff(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(arr).save(path, format="TIFF")
    return path


def _load(path: Path) -> np.ndarray:
    return make_loader(image_only=True)(str(path)).numpy()


# one generator per format: (file name, writer, expected spatial shape, expected dims)
CASES_2D = {
    "png8": ("a.png", lambda p: write_png(p, make_array((20, 24), 1)), (24, 20)),
    "png16": ("a.png", lambda p: write_png(p, make_array((20, 24), 2, "uint16")), (24, 20)),
    "png_rgb": ("a.png", lambda p: write_png(p, np.stack([make_array((20, 24), s) for s in (1, 2, 3)], -1)), (24, 20)),
    "png_rgba": (
        "a.png",
        lambda p: write_png(p, np.stack([make_array((20, 24), s) for s in (1, 2, 3, 4)], -1)),
        (24, 20),
    ),
    "jpeg": ("a.jpg", lambda p: write_png(p, make_array((20, 24), 3)), (24, 20)),
    "tiff8": ("a.tif", lambda p: _write_tiff(p, make_array((20, 24), 4)), (24, 20)),
    "tiff16": ("a.tiff", lambda p: _write_tiff(p, make_array((20, 24), 5, "uint16")), (24, 20)),
    "dicom2d": ("a.dcm", lambda p: write_dicom(p, make_array((20, 24), 6, "uint16")), (24, 20)),
    "dicom_rgb": (
        "a.dcm",
        lambda p: write_dicom(p, np.stack([make_array((20, 24), s) for s in (1, 2, 3)], -1)),
        (24, 20),
    ),
    "dicom_nosuffix": ("IM0001", lambda p: write_dicom(p, make_array((20, 24), 7, "uint16")), (24, 20)),
    "nifti2d": ("a.nii.gz", lambda p: write_nifti(p, make_array((24, 20), 8, "float32")), (24, 20)),
    "nifti2d_singleton": ("a.nii", lambda p: write_nifti(p, make_array((24, 20, 1), 9, "float32")), (24, 20)),
    "nrrd2d": ("a.nrrd", lambda p: _write_sitk(p, make_array((20, 24), 10, "float32")), (24, 20)),
    "mha2d": ("a.mha", lambda p: _write_sitk(p, make_array((20, 24), 11, "uint16")), (24, 20)),
    "npy2d": ("a.npy", lambda p: np.save(p, make_array((24, 20), 12, "float32")), (24, 20)),
}

CASES_3D = {
    "nifti3d": ("a.nii.gz", lambda p: write_nifti(p, make_array((12, 10, 8), 1, "float32")), (12, 10, 8)),
    "nifti3d_trailing_singleton_4th": (
        "a.nii.gz",
        lambda p: write_nifti(p, make_array((12, 10, 8, 1), 2, "float32")),
        (12, 10, 8),
    ),
    "dicom_multiframe": (
        "a.dcm",
        lambda p: write_dicom(p, make_array((8, 10, 12), 3, "uint16"), multiframe=True),
        (12, 10, 8),
    ),
    "dicom_series_folder": (
        "series",
        lambda p: write_dicom_series(p, make_array((8, 10, 12), 4, "uint16")),
        (12, 10, 8),
    ),
    "nrrd3d": ("a.nrrd", lambda p: _write_sitk(p, make_array((8, 10, 12), 5, "float32")), (12, 10, 8)),
    "mha3d": ("a.mha", lambda p: _write_sitk(p, make_array((8, 10, 12), 6, "int16")), (12, 10, 8)),
    "mhd3d": ("a.mhd", lambda p: _write_sitk(p, make_array((8, 10, 12), 7, "float32")), (12, 10, 8)),
    "npy3d": ("a.npy", lambda p: np.save(p, make_array((12, 10, 8), 8, "float32")), (12, 10, 8)),
}


FORMAT_CASES = [(2, c) for c in sorted(CASES_2D)] + [(3, c) for c in sorted(CASES_3D)]
PREPROCESS = {2: PreprocessConfig(spatial_dims=2, spatial_size=(16, 16)),
              3: PreprocessConfig(spatial_dims=3, spatial_size=(8, 8, 8), resize=False)}


@pytest.mark.parametrize(("dims", "case"), FORMAT_CASES)
def test_formats_load_and_preprocess(tmp_path, dims, case):
    name, write, shape = (CASES_2D if dims == 2 else CASES_3D)[case]
    path = tmp_path / "set" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    images = load_image_set(tmp_path / "set", "train", strict=True)
    assert len(images) == 1 and images.spatial_dims == dims
    assert list(images.shapes) == [shape]
    out = preprocess_transforms(PREPROCESS[dims])(images.records[0])["image"]
    assert tuple(out.shape) == (1,) + tuple(PREPROCESS[dims].spatial_size)
    if dims == 2:
        assert float(out.min()) == pytest.approx(0.0) and float(out.max()) == pytest.approx(1.0)


def test_orientation_consistent_across_formats(tmp_path):
    """The same voxels written as NIfTI, MHA and NRRD load to the same array (x, y, z order)."""
    vol = make_array((6, 7, 8), 3, "float32")  # (z, y, x) for SimpleITK
    a = _load(_write_sitk(tmp_path / "v.mha", vol))
    b = _load(_write_sitk(tmp_path / "v.nrrd", vol))
    c = _load(write_nifti(tmp_path / "v.nii.gz", np.ascontiguousarray(vol.transpose(2, 1, 0))))
    assert a.shape == (8, 7, 6)
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, c)


def test_sitk_spacing(tmp_path):
    path = _write_sitk(tmp_path / "v.mha", make_array((6, 7, 8), 1, "float32"), spacing=(0.5, 0.75, 2.0))
    assert probe_image(path).spacing == (0.5, 0.75, 2.0)


def test_dicom_rescale_slope_intercept(tmp_path):
    raw = make_array((10, 12), 1, "uint16")
    path = write_dicom(tmp_path / "a.dcm", raw, slope=2.0, intercept=-1024.0)
    loaded = _load(path)
    np.testing.assert_allclose(loaded, raw.T.astype(np.float32) * 2.0 - 1024.0)


def test_dicom_monochrome1_inverted(tmp_path):
    raw = make_array((10, 12), 1, "uint16")
    m2 = _load(write_dicom(tmp_path / "m2.dcm", raw, photometric="MONOCHROME2"))
    m1 = _load(write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, m2.max() + m2.min() - m2)


def test_dicom_patient_id_is_subject(tmp_path):
    write_dicom(tmp_path / "s" / "a.dcm", make_array((10, 12), 1, "uint16"), patient_id="PAT-7")
    write_dicom_series(tmp_path / "s" / "vol", make_array((4, 10, 12), 2, "uint16"), patient_id="PAT-9")
    two = load_image_set(tmp_path / "s", "x", spatial_dims=2)
    three = load_image_set(tmp_path / "s", "x", spatial_dims=3)
    assert [r["subject_id"] for r in two.records] == ["PAT-7"]
    assert [r["subject_id"] for r in three.records] == ["PAT-9"]
    assert three.records[0]["image"].endswith("vol")


def test_dicom_series_multiframe_same_orientation(tmp_path):
    vol = make_array((5, 10, 12), 3, "uint16")
    a = _load(write_dicom(tmp_path / "mf.dcm", vol, multiframe=True))
    b = _load(write_dicom_series(tmp_path / "series", vol))
    assert a.shape == b.shape == (12, 10, 5)
    np.testing.assert_allclose(a, b)


def test_nifti_real_4d_is_rejected(tmp_path):
    path = write_nifti(tmp_path / "bold.nii.gz", make_array((8, 8, 6, 3), 1, "float32"))
    with pytest.raises(InputError, match="4D"):
        probe_image(path)


def test_palette_png_gives_intensities_not_indices(tmp_path):
    from PIL import Image

    grey = make_array((20, 24), 1)
    # a shuffled palette: index perm[g] shows grey level g, so indices say nothing about brightness
    perm = np.random.default_rng(0).permutation(256)
    pal = Image.fromarray(perm[grey].astype(np.uint8), mode="P")
    levels = np.empty(256, np.uint8)
    levels[perm] = np.arange(256)
    pal.putpalette(np.repeat(levels, 3).tolist())
    pal.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    loaded = preprocess_transforms(PreprocessConfig(spatial_dims=2, spatial_size=(24, 20), resize=False))(
        {"image": str(tmp_path / "pal.png")}
    )["image"][0].numpy()
    reference = grey.T.astype(float)
    assert np.corrcoef(loaded.ravel(), reference.ravel())[0, 1] > 0.95


def test_multipage_tiff_refused(tmp_path):
    from PIL import Image

    pages = [Image.fromarray(make_array((16, 16), k)) for k in range(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(InputError, match="multi-page file \\(3 pages\\)"):
        probe_image(tmp_path / "stack.tif")


def test_format_detection():
    assert image_suffix("a/B.NII.GZ") == ".nii.gz"
    assert format_of("x.mhd") == "sitk" and format_of("x.npy") == "numpy" and format_of("x.tif") == "pil"
    assert format_of("x.txt") is None


# ------------------------------------------------------------------------------------------------ real files

REAL_FILES = [
    ("mri_t1/colin27_t1.nii.gz", 3, (181, 217, 181)),
    ("mri_t1/robex_ref_t1.nii.gz", 3, (116, 150, 155)),  # trailing singleton 4th axis
    ("cxr/NORMAL2-IM-1427-0001.jpeg", 2, None),
    ("dicom/RG1_UNCR.dcm", 2, None),  # MONOCHROME1, 15-bit
]


@pytest.mark.parametrize("rel, dims, shape", REAL_FILES)
def test_real_files(real_data, rel, dims, shape):
    info = probe_image(real_data / rel)
    assert info.spatial_dims == dims and info.channels == 1
    if shape is not None:
        assert info.spatial_shape == shape


def test_real_monochrome1_dicom_air_is_dark(real_data):
    """RG1 is a chest CR stored MONOCHROME1: after inversion the image border (air/collimation) is not bright."""
    img = _load(real_data / "dicom" / "RG1_UNCR.dcm")
    centre = img[img.shape[0] // 3 : 2 * img.shape[0] // 3, img.shape[1] // 3 : 2 * img.shape[1] // 3]
    assert img.shape == (1841, 1955)
    assert np.isfinite(img).all() and img.max() > img.min()
    assert centre.mean() > np.percentile(img, 5)


def test_real_folders_through_loader(real_data):
    mri = load_image_set(real_data / "mri_t1", "mri", strict=True)
    assert mri.spatial_dims == 3 and len(mri) == 3 and (1.5, 1.5, 1.5) in mri.spacings
    cxr = load_image_set(real_data / "cxr", "cxr", subject_regex=r"^(NORMAL2-IM-\d+|person\d+)", strict=True)
    assert cxr.spatial_dims == 2 and len(cxr) == 16 and len(cxr.subjects) == 15  # person1946 has two images
    dicom = load_image_set(real_data / "dicom", "dicom", strict=True)
    assert len(dicom) == 2 and all(r["subject_id"] for r in dicom.records)


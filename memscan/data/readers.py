"""Image readers and per-file validation.

Every format goes through MONAI's ``LoadImage`` with explicit readers:

- PNG / JPEG / TIFF (8- and 16-bit, RGB reduced to grey later): :class:`monai.data.PILReader`
- DICOM (single 2D file, multi-frame file, or a folder holding one series): :class:`monai.data.PydicomReader`
  (rescale slope/intercept applied by MONAI; MONOCHROME1 inverted here)
- NIfTI ``.nii/.nii.gz`` (2D or 3D; trailing singleton 4th axis squeezed): :class:`monai.data.NibabelReader`
- NRRD / MHA / MHD: :class:`SimpleITKReader`
- ``.npy`` arrays: :class:`monai.data.NumpyReader`
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import ImageReader, NibabelReader, NumpyReader, PILReader, PydicomReader
from monai.data.utils import affine_to_spacing, orientation_ras_lps
from monai.transforms import LoadImage
from monai.utils import ensure_tuple

from memscan.errors import InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "COMPANION_SUFFIXES",
    "ImageInfo",
    "MemscanReader",
    "SimpleITKReader",
    "format_of",
    "image_suffix",
    "is_dicom_file",
    "make_loader",
    "probe_image",
    "probe_image_cached",
    "spatial_shape_of",
]

#: suffix -> reader family
IMAGE_SUFFIXES: dict[str, str] = {
    ".png": "pil",
    ".jpg": "pil",
    ".jpeg": "pil",
    ".tif": "pil",
    ".tiff": "pil",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "sitk",
    ".nhdr": "sitk",
    ".mha": "sitk",
    ".mhd": "sitk",
    ".npy": "numpy",
}
#: pixel-data files referenced by a header (.mhd/.nhdr); never images on their own
COMPANION_SUFFIXES: frozenset[str] = frozenset({".raw", ".zraw", ".raw.gz"})
_COLOUR_FORMATS = {"pil", "sitk", "dicom"}


def image_suffix(path: str | Path) -> str:
    """Lower-case suffix of ``path``, keeping double suffixes such as ``.nii.gz``."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".raw.gz"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def is_dicom_file(path: str | Path) -> bool:
    """True when ``path`` starts with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def format_of(path: str | Path) -> str | None:
    """Reader family for ``path`` (``"pil"``, ``"dicom"``, ``"nifti"``, ``"sitk"``, ``"numpy"``) or None.

    A directory is a DICOM series; a file without a known suffix is DICOM when it carries the DICOM preamble.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom"
    fmt = IMAGE_SUFFIXES.get(image_suffix(p))
    if fmt is None and image_suffix(p) not in COMPANION_SUFFIXES and is_dicom_file(p):
        return "dicom"
    return fmt


class SimpleITKReader(ImageReader):
    """Read NRRD / MHA / MHD (and anything SimpleITK reads) into MONAI's (x, y[, z][, c]) RAS convention.

    MONAI's ``ITKReader`` needs the ``itk`` package, which memscan does not depend on; SimpleITK is a dependency.
    """

    suffixes: tuple[str, ...] = (".nrrd", ".nhdr", ".mha", ".mhd")

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return all(image_suffix(f) in self.suffixes for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> Any:
        import SimpleITK as sitk

        images = [sitk.ReadImage(str(f)) for f in ensure_tuple(data)]
        return images[0] if len(images) == 1 else images

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        import SimpleITK as sitk

        if isinstance(img, (list, tuple)):
            if len(img) != 1:
                raise ValueError("SimpleITKReader reads one image at a time")
            img = img[0]
        dim = img.GetDimension()
        ncomp = img.GetNumberOfComponentsPerPixel()
        arr = np.asarray(sitk.GetArrayFromImage(img))
        # SimpleITK arrays are (z, y, x[, c]); MONAI readers return (x, y, z[, c])
        order = list(range(dim))[::-1] + ([dim] if ncomp > 1 else [])
        arr = np.ascontiguousarray(arr.transpose(order))
        spacing = np.asarray(img.GetSpacing(), dtype=float)
        direction = np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim)
        affine = np.eye(dim + 1)
        affine[:dim, :dim] = direction * spacing[None, :]
        affine[:dim, dim] = np.asarray(img.GetOrigin(), dtype=float)
        if dim in (2, 3):
            affine = orientation_ras_lps(affine)  # ITK physical space is LPS
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(arr.shape[:dim]),
            "spacing": spacing,
            "original_channel_dim": -1 if ncomp > 1 else float("nan"),
            "space": "RAS",
        }
        return arr, meta


def _pil_to_pixels(img: Any) -> Any:
    """Make a PIL image's array hold intensities: palette / bilevel / CMYK converted; multi-page files refused."""
    if getattr(img, "n_frames", 1) > 1:
        raise ValueError(f"multi-page file ({img.n_frames} pages) not supported: save one image per file")
    if img.mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")  # palette indices are not intensities
    if img.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("L" if img.mode == "1" else "RGB")
    return img


class MemscanReader(ImageReader):
    """One explicit MONAI reader per format, chosen by suffix (directories are DICOM series).

    LoadImage otherwise falls back to every installed reader when one fails; dispatching here keeps one reader per
    format (so errors name the real cause) and adds the MONOCHROME1 inversion ``PydicomReader`` lacks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.readers: dict[str, ImageReader] = {
            "pil": PILReader(converter=_pil_to_pixels),
            "dicom": PydicomReader(fname_regex=None),
            "nifti": NibabelReader(squeeze_non_spatial_dims=True),
            "sitk": SimpleITKReader(),
            "numpy": NumpyReader(),
        }

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return all(format_of(f) is not None for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> Any:
        names = ensure_tuple(data)
        fmt = format_of(names[0])
        if fmt is None:
            raise ValueError(f"unsupported format '{image_suffix(names[0]) or '(no suffix)'}'")
        return fmt, self.readers[fmt].read(data, **kwargs)

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        fmt, obj = img
        with warnings.catch_warnings():
            # 2D radiographs have no ImagePositionPatient; the identity affine MONAI falls back to is right for them
            warnings.filterwarnings("ignore", message="PydicomReader: ImageOrientationPatient")
            arr, meta = self.readers[fmt].get_data(obj)
        if fmt == "dicom":
            first = obj[0] if isinstance(obj, list) else obj
            if not isinstance(obj, list) and int(getattr(obj, "NumberOfFrames", 1) or 1) > 1:
                if int(getattr(obj, "SamplesPerPixel", 1) or 1) > 1:
                    raise ValueError("multi-frame colour DICOM (cine) not supported")
                arr, meta = _fix_multiframe(obj, arr, meta)
            elif int(getattr(first, "SamplesPerPixel", 1) or 1) > 1 and arr.ndim == 3:
                # colour samples are the last axis; PydicomReader reports them as a spatial axis
                meta["original_channel_dim"] = -1
                meta["spatial_shape"] = tuple(arr.shape[:-1])
            if str(getattr(first, "PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
                # MONOCHROME1: low values are bright; flip within the image's own range so air stays dark
                arr = arr.max() + arr.min() - arr
        meta["memscan_format"] = fmt
        return arr, meta


def _fix_multiframe(ds: Any, arr: np.ndarray, meta: dict) -> tuple[np.ndarray, dict]:
    """Put a grey multi-frame DICOM into (x=column, y=row, z=frame) order with a spacing-only affine.

    PydicomReader swaps the first two axes of ``pixel_array`` as if it were (row, column, ...), which for
    (frame, row, column) data yields (row, frame, column).
    """
    arr = np.ascontiguousarray(np.transpose(arr, (2, 0, 1)))  # (row, frame, col) -> (col, row, frame)
    try:
        dr, dc = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        dr = dc = 1.0
    dz = float(getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 0) or 1.0)
    affine = np.diag([dc, dr, dz, 1.0])
    meta = dict(meta)
    meta.update(
        {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": tuple(arr.shape),
            "original_channel_dim": float("nan"),
        }
    )
    return arr, meta


@dataclass(frozen=True)
class ImageInfo:
    """What validation learned about one image.

    Attributes:
        spatial_shape: spatial shape after squeezing trailing singleton axes (2 or 3 entries).
        spacing: voxel spacing per spatial axis (1.0 where the format has none).
        channels: number of channels (1 grey, 3/4 colour).
        content_hash: SHA-256 of the decoded pixels (same pixels in another file format -> same hash).
        format: reader family.
    """

    spatial_shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int
    content_hash: str
    format: str

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)


def spatial_shape_of(shape: Sequence[int]) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the second (a 2D image stored as X×Y×1 is 2D)."""
    out = list(shape)
    while len(out) > 2 and out[-1] == 1:
        out.pop()
    return tuple(int(s) for s in out)


_LOCAL = threading.local()


def _loader() -> LoadImage:
    # readers keep per-call state (PydicomReader.filenames): one loader per thread
    if not hasattr(_LOCAL, "loader"):
        _LOCAL.loader = make_loader(image_only=True, ensure_channel_first=True)
    return _LOCAL.loader


class _NoGpuDecoderNoise(logging.Filter):
    """Drop MONAI's per-loader notice that the optional GPU DICOM decoder is absent (memscan never uses it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "nvImageCodec" not in record.getMessage()


logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").addFilter(_NoGpuDecoderNoise())


def make_loader(**kwargs: Any) -> LoadImage:
    """``LoadImage`` with :class:`MemscanReader`, without the noise MONAI makes registering absent GPU readers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        return LoadImage(reader=MemscanReader, **kwargs)


def probe_image(path: str | Path) -> ImageInfo:
    """Open one image through MONAI ``LoadImage`` and check it is usable.

    Args:
        path: image file, or folder holding one DICOM series.

    Returns:
        The image's :class:`ImageInfo`.

    Raises:
        InputError: empty, unreadable, corrupt, unsupported, 4D, NaN/Inf or constant image.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(path, "file not found")
    if not os.access(p, os.R_OK):
        raise InputError(path, "permission denied (file is not readable)")
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    fmt = format_of(p)
    if fmt is None:
        raise InputError(path, f"unsupported format '{image_suffix(p) or '(no suffix)'}'")
    try:
        loader = _loader()
        img = loader(str(p), reader=loader.readers[-1])
    except PermissionError:
        raise InputError(path, "permission denied (file is not readable)") from None
    except Exception as err:  # every reader raises its own exception types for corrupt files
        msg = " ".join(str(err).split())[:160] or type(err).__name__
        raise InputError(path, f"cannot read as {fmt} image ({type(err).__name__}: {msg})") from None
    channels = int(img.shape[0])
    spatial = spatial_shape_of(img.shape[1:])
    if len(spatial) < 2:
        raise InputError(path, f"not an image: shape {tuple(img.shape[1:])}")
    if len(spatial) > 3:
        raise InputError(
            path, f"{len(spatial)}D data (shape {spatial}) not supported: give one 2D or 3D image per file"
        )
    if channels > 1 and (fmt not in _COLOUR_FORMATS or channels > 4):
        raise InputError(
            path,
            f"4D / multi-channel data (shape {tuple(img.shape[1:])} with {channels} volumes or channels) not "
            "supported: give one 2D or 3D image per file",
        )
    # NumPy, not torch: torch's intra-op thread pool makes these small reductions slow on a busy CPU
    arr = np.ascontiguousarray((img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)).numpy())
    finite = np.isfinite(arr)
    if not finite.all():
        n_bad = int(arr.size - np.count_nonzero(finite))
        raise InputError(path, f"contains NaN/Inf pixels ({n_bad} of {arr.size})")
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise InputError(path, f"constant image (every pixel = {lo:g})")
    digest = hashlib.sha256(arr.data)  # SHA-256 has CPU instructions: about twice as fast here as BLAKE2b
    digest.update(repr(arr.shape).encode())
    affine = getattr(img, "affine", None)
    spacing: tuple[float, ...] = tuple(1.0 for _ in spatial)
    if affine is not None:
        try:
            sp = affine_to_spacing(torch.as_tensor(affine), r=len(spatial))
            spacing = tuple(round(float(s), 4) for s in sp)
        except Exception:  # a degenerate affine must not reject an otherwise valid image
            pass
    spacing = tuple(1.0 if not math.isfinite(s) or s == 0 else s for s in spacing)
    return ImageInfo(spatial, spacing, channels, digest.hexdigest(), fmt)


_PROBED: dict[tuple[str, int, int], ImageInfo] = {}
_PROBED_MAX = 1_000_000


def probe_image_cached(path: str | Path) -> ImageInfo:
    """:func:`probe_image`, remembered for this process per (file, size, modification time).

    The audit, the bundle configs and ``memscan check`` may load the same set more than once in one process; a file
    is then validated (decoded) once. Folders (DICOM series) and failures are not remembered.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return probe_image(path)
    if not p.is_file():
        return probe_image(path)
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    info = _PROBED.get(key)
    if info is None:
        info = probe_image(path)
        if len(_PROBED) >= _PROBED_MAX:
            _PROBED.clear()
        _PROBED[key] = info
    return info

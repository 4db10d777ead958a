"""Data layer: discover, validate and identify images; MONAI preprocessing and contrastive views; preflight checks.

Public API::

    load_image_set(source, name, ...) -> ImageSet
    PreprocessConfig, preprocess_transforms(cfg), view_transforms(cfg, augment), make_dataset(records, transforms)
    split_by_subject(records, val_fraction, seed)
    check_sets(train, val, synthetic) -> CheckReport
    demo_data_dir() -> Path
"""

from __future__ import annotations

from pathlib import Path

from memscan.data.check import CheckReport, check_sets, check_sources
from memscan.data.discovery import (
    LAYOUTS,
    MRNET_PLANES,
    ImageSet,
    detect_layout,
    discover,
    load_image_set,
    records_to_manifest,
)
from memscan.data.readers import MemscanReader, SimpleITKReader, probe_image
from memscan.data.subjects import split_by_subject, subject_overlap
from memscan.data.transforms import (
    AUGMENT_FAMILIES,
    AUGMENT_PRESETS,
    AntiAliasedResized,
    EnsureSpatialDimsd,
    PreprocessConfig,
    ToGreyd,
    make_dataset,
    preprocess_transforms,
    transform_fingerprint,
    view_transforms,
)

__all__ = [
    "AUGMENT_FAMILIES",
    "AUGMENT_PRESETS",
    "LAYOUTS",
    "MRNET_PLANES",
    "CheckReport",
    "AntiAliasedResized",
    "EnsureSpatialDimsd",
    "ImageSet",
    "MemscanReader",
    "PreprocessConfig",
    "SimpleITKReader",
    "ToGreyd",
    "check_sets",
    "check_sources",
    "demo_data_dir",
    "detect_layout",
    "discover",
    "load_image_set",
    "make_dataset",
    "preprocess_transforms",
    "probe_image",
    "records_to_manifest",
    "split_by_subject",
    "subject_overlap",
    "transform_fingerprint",
    "view_transforms",
]


def demo_data_dir() -> Path:
    """Folder of the real demo images committed inside the package (built by ``scripts/build_demo_data.py``)."""
    return Path(__file__).resolve().parent.parent / "demo_data"

"""Subject (patient) ids, cross-set overlap and patient-disjoint splitting.

Copies can only be judged against *other* patients: a validation set that shares patients (or identical files) with
the training set inflates the threshold τ and hides copies (Dar et al., 2025). These helpers find such overlap and
build patient-disjoint splits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memscan.errors import InputError

__all__ = [
    "default_subject",
    "dicom_patient_id",
    "compile_subject_regex",
    "subject_from_regex",
    "subject_overlap",
    "split_by_subject",
]


def default_subject(path: str | Path) -> str:
    """Subject id used when nothing better is known: the file name without image suffixes (folder name for series)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".raw.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix else name


def dicom_patient_id(path: str | Path) -> str | None:
    """``PatientID`` of a DICOM file (first file of a series folder), or None when absent or unreadable."""
    import pydicom

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        if not files:
            return None
        p = files[0]
    try:
        ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # unreadable header: validation reports the file itself
        return None
    value = str(getattr(ds, "PatientID", "") or "").strip()
    return value or None


def compile_subject_regex(pattern: str | None) -> re.Pattern[str] | None:
    """Compile ``--subject-regex``; it needs a named group ``subject`` or at least one group.

    Raises:
        InputError: invalid pattern or no group.
    """
    if pattern is None:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise InputError("--subject-regex", f"invalid regular expression {pattern!r}: {err}") from None
    if regex.groups < 1:
        raise InputError("--subject-regex", f"{pattern!r} needs a capture group, e.g. '(?P<subject>[^_]+)_'")
    return regex


def subject_from_regex(regex: re.Pattern[str], path: str) -> str | None:
    """Subject id captured by ``regex`` (group ``subject``, else the first group) in ``path``; None if no match."""
    m = regex.search(path)
    if m is None:
        return None
    value = m.group("subject") if "subject" in regex.groupindex else m.group(1)
    return value or None


def _subjects(records: Iterable[dict[str, Any]]) -> set[str]:
    return {str(r["subject_id"]) for r in records}


def subject_overlap(a: Iterable[dict[str, Any]], b: Iterable[dict[str, Any]]) -> list[str]:
    """Sorted subject ids present in both record lists."""
    return sorted(_subjects(a) & _subjects(b))


def split_by_subject(
    records: Sequence[dict[str, Any]], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split records into patient-disjoint training and validation lists, reproducibly.

    ``round(val_fraction × n_subjects)`` subjects (at least one, at most all but one) go to validation, drawn with
    ``numpy.random.default_rng(seed)`` from the sorted subject ids, so the split depends only on the set of subjects
    and the seed, not on record order. Record order is kept inside each part.

    Args:
        records: records with a ``subject_id`` key.
        val_fraction: fraction of *subjects* (not images) for validation, in (0, 1).
        seed: random seed.

    Returns:
        ``(train_records, val_records)``.

    Raises:
        InputError: fewer than two subjects or a fraction outside (0, 1).
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise InputError("--val-fraction", f"must be between 0 and 1 (exclusive), got {val_fraction}")
    subjects = sorted(_subjects(records))
    if len(subjects) < 2:
        raise InputError(
            None, f"cannot split {len(records)} image(s) of {len(subjects)} subject(s) into patient-disjoint sets"
        )
    n_val = int(min(max(round(val_fraction * len(subjects)), 1), len(subjects) - 1))
    rng = np.random.default_rng(seed)
    val_subjects = {subjects[i] for i in rng.permutation(len(subjects))[:n_val]}
    train = [r for r in records if str(r["subject_id"]) not in val_subjects]
    val = [r for r in records if str(r["subject_id"]) in val_subjects]
    return train, val

"""Preflight check of the training, validation and synthetic sets (``memscan check`` and the start of every audit).

Reports per set: usable count, 2D/3D, shapes and spacings, subjects, what was skipped and why; and across sets:
patients or identical images shared by training and validation (either inflates τ and hides copies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from memscan.data.discovery import SKIPPED_COLUMNS, ImageSet, load_image_set
from memscan.data.subjects import subject_overlap
from memscan.errors import InputError
from memscan.io import write_csv_atomic

__all__ = ["CheckReport", "check_sets", "check_sources"]

_MAX_LISTED = 5
#: fewer validation patients than this get a warning: τ then rests on how close those few come to the training set
MIN_VAL_SUBJECTS = 5
#: fewer training images than this get a warning: τ is the 95th percentile of one value per training image (its best
#: validation correlation), and a new image scored like them exceeds the largest of n such values with chance
#: 1 / (n + 1), above 5% for n < 19 (the detection benchmark's CXR case, 5-6 training images: up to 0.31 false alarms)
MIN_TRAIN_IMAGES = 19



def _fmt_shape(shape: Sequence[Any]) -> str:
    return "×".join(f"{s:g}" if isinstance(s, float) else str(s) for s in shape)


def _fmt_counts(counts: Mapping[tuple, int], limit: int = 4) -> str:
    items = list(counts.items())
    text = ", ".join(f"{_fmt_shape(k)} ({v})" for k, v in items[:limit])
    return text + (f", +{len(items) - limit} more" if len(items) > limit else "")


def _examples(values: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(values[:limit])
    return shown + (", ..." if len(values) > limit else "")


@dataclass
class CheckReport:
    """Result of the preflight.

    Attributes:
        sets: loaded sets by name (``train``, ``val``, synthetic names).
        roles: set name -> ``train`` / ``val`` / ``synthetic``.
        errors: set name -> why the set could not be used at all.
        warnings: overlap and consistency warnings (the sets stay usable).
        notes: informative findings (e.g. synthetic images pixel-identical to training images).
    """

    sets: dict[str, ImageSet] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """True when training and validation loaded, every set loaded, and all share one dimensionality."""
        if self.errors:
            return False
        roles = set(self.roles.values())
        return "train" in roles and "val" in roles and len({s.spatial_dims for s in self.sets.values()}) == 1

    @property
    def skipped(self) -> pd.DataFrame:
        """All skipped files of all sets (columns ``set, path, reason, row``)."""
        frames = [s.skipped for s in self.sets.values() if len(s.skipped)]
        if not frames:
            frame = pd.DataFrame(columns=SKIPPED_COLUMNS)
            frame["row"] = frame["row"].astype("Int64")
            return frame
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary (per-set counts, warnings, notes, errors, usable)."""
        per_set = {}
        for name, s in self.sets.items():
            per_set[name] = {
                "role": self.roles.get(name, ""),
                "source": s.source,
                "layout": s.layout,
                "n_images": len(s),
                "spatial_dims": s.spatial_dims,
                "n_subjects": len(s.subjects),
                "n_skipped": int(len(s.skipped)),
                "shapes": {_fmt_shape(k): v for k, v in s.shapes.items()},
                "spacings": {_fmt_shape(k): v for k, v in s.spacings.items()},
            }
        return {
            "usable": self.usable,
            "sets": per_set,
            "errors": dict(self.errors),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }

    def to_text(self) -> str:
        """Human-readable report, one block per set then warnings and the verdict."""
        lines: list[str] = []
        for name, role in self.roles.items():
            label = f"{role} set '{name}'" if role == "synthetic" else f"{role} set"
            if name in self.errors:
                lines.append(f"{label}: NOT USABLE: {self.errors[name]}")
                continue
            s = self.sets[name]
            lines.append(
                f"{label}: {len(s)} image(s), {s.spatial_dims}D, {len(s.subjects)} subject(s), "
                f"{len(s.skipped)} skipped  [{s.layout}: {s.source}]"
            )
            lines.append(f"  subjects: {_examples(s.subjects, 8)}")
            lines.append(f"  shapes:   {_fmt_counts(s.shapes)}")
            lines.append(f"  spacings: {_fmt_counts(s.spacings)}")
            if len(s.skipped):
                for rec in s.skipped.head(_MAX_LISTED).itertuples(index=False):
                    where = f"{rec.path} (row {rec.row})" if not pd.isna(rec.row) else rec.path
                    lines.append(f"  skipped {where}: {rec.reason}")
                if len(s.skipped) > _MAX_LISTED:
                    lines.append(f"  ... {len(s.skipped) - _MAX_LISTED} more skipped (see skipped.csv)")
        for w in self.warnings:
            lines.append(f"WARNING: {w}")
        for n in self.notes:
            lines.append(f"note: {n}")
        if self.usable:
            lines.append("result: usable")
        else:
            why = "; ".join(f"{k}: {v}" for k, v in self.errors.items()) or "see warnings above"
            lines.append(f"result: NOT usable ({why})")
        return "\n".join(lines)

    def write_skipped(self, out_dir: str | Path) -> Path:
        """Write ``skipped.csv`` (possibly header-only) into ``out_dir`` atomically and return its path."""
        return write_csv_atomic(self.skipped, Path(out_dir) / "skipped.csv")


def check_sets(
    train: ImageSet | None,
    val: ImageSet | None,
    synthetic: Mapping[str, ImageSet] | None = None,
) -> CheckReport:
    """Cross-set checks on loaded sets.

    Args:
        train: the generative model's training images.
        val: held-out real images of other patients (calibrates τ).
        synthetic: synthetic sets by name.

    Returns:
        The :class:`CheckReport`.
    """
    report = CheckReport()
    for role, s in (("train", train), ("val", val)):
        if s is None:
            report.errors[role] = f"no {'training' if role == 'train' else 'validation'} set given"
            report.roles[role] = role
        else:
            report.sets[s.name] = s
            report.roles[s.name] = role
    for name, s in (synthetic or {}).items():
        if name in report.sets:
            raise InputError("--synthetic", f"set name {name!r} is used twice")
        report.sets[name] = s
        report.roles[name] = "synthetic"
    _cross_checks(report, train, val)
    return report


def _cross_checks(report: CheckReport, train: ImageSet | None, val: ImageSet | None) -> None:
    dims = {name: s.spatial_dims for name, s in report.sets.items()}
    if len(set(dims.values())) > 1:
        report.errors["dimensions"] = "sets mix 2D and 3D: " + ", ".join(f"{k} {v}D" for k, v in dims.items())
    if train is not None and val is not None:
        shared = subject_overlap(train.records, val.records)
        if shared:
            report.warnings.append(
                f"{len(shared)} subject(s) appear in both training and validation ({_examples(shared)}): "
                "validation must hold other patients, otherwise τ is inflated and copies are hidden"
            )
        train_hash = {h: p for h, p in zip(train.hashes, train.paths)}
        same = [(p, train_hash[h]) for h, p in zip(val.hashes, val.paths) if h in train_hash]
        if same:
            report.warnings.append(
                f"{len(same)} validation image(s) are pixel-identical to training images "
                f"({_examples([f'{v} = {t}' for v, t in same], 3)}): this inflates τ and hides copies"
            )
    if train is not None:
        train_hashes = set(train.hashes)
        for name, role in report.roles.items():
            if role != "synthetic" or name not in report.sets:
                continue
            n = sum(h in train_hashes for h in report.sets[name].hashes)
            if n:
                report.notes.append(
                    f"synthetic set '{name}': {n} image(s) are pixel-identical to training images (exact copies)"
                )
    if val is not None and 0 < len(val.subjects) < MIN_VAL_SUBJECTS:
        single = len(val.subjects) == 1  # the audit's null rate then splits by image (memscan.audit)
        report.warnings.append(
            f"validation holds {len(val.subjects)} patient(s): τ is the 95th percentile of how close those patients "
            "come to the training set, which varies from patient to patient, so the false-positive rate on other new "
            f"patients is uncertain (the detection benchmark saw 1-60% with one); use {MIN_VAL_SUBJECTS} or more"
            + ("; with a single patient, the null rate splits it by image, and training/validation pairs of the same "
               "patient are not excluded" if single else "")
        )
    for name, s in report.sets.items():
        if report.roles.get(name) == "train" and 0 < len(s) < MIN_TRAIN_IMAGES:
            report.warnings.append(
                f"set '{name}' has only {len(s)} image(s): τ is the 95th percentile of {len(s)} values (each training "
                f"image's best validation correlation), and a new image exceeds the largest of them with "
                f"chance about 1/{len(s) + 1} = {1 / (len(s) + 1):.0%}, so false alarms above 5% are likely; use "
                f"{MIN_TRAIN_IMAGES} or more")
        elif len(s) < 10 and report.roles.get(name) == "val":
            report.warnings.append(f"set '{name}' has only {len(s)} image(s): statistics will be weak")


def check_sources(
    train: str | Path | None,
    val: str | Path | None,
    synthetic: Mapping[str, str | Path] | Sequence[str | Path] | None = None,
    *,
    layout: str = "auto",
    subject_regex: str | None = None,
    plane: str = "sagittal",
    train_split: str | None = None,
    val_split: str | None = None,
    strict: bool = False,
    spatial_dims: int | None = None,
) -> CheckReport:
    """Load every set with :func:`~memscan.data.load_image_set`, then run :func:`check_sets`.

    ``layout`` and ``subject_regex`` apply to training and validation; synthetic sets are auto-detected and keyed by
    file stem. A set that cannot be loaded (missing, empty after skipping) makes the report unusable instead of
    stopping the check, unless ``strict``.

    Args:
        train: training images source.
        val: validation images source.
        synthetic: synthetic sources (a mapping name -> source, or a list named by folder/file stem).
        layout: layout of train and val (``auto``, ``folder``, ``manifest``, ``nih``, ``mrnet``).
        subject_regex: regex capturing subject ids in train/val paths.
        plane: MRNet plane.
        train_split: official split for the training source (NIH ``train_val``/``test``, MRNet ``train``/``valid``).
        val_split: official split for the validation source.
        strict: any bad file is an error (raises :class:`~memscan.errors.InputError`).
        spatial_dims: expected dimensionality (None: each set's majority).

    Returns:
        The :class:`CheckReport`.

    Raises:
        InputError: strict mode and any problem, or duplicate synthetic names.
    """
    if synthetic is None:
        synthetic = {}
    if not isinstance(synthetic, Mapping):
        named: dict[str, str | Path] = {}
        for src in synthetic:
            stem = Path(src).name or str(src)
            stem = stem[: -len(".csv")] if stem.lower().endswith(".csv") else stem
            key, k = stem, 2
            while key in named or key in ("train", "val"):
                key, k = f"{stem}_{k}", k + 1
            named[key] = src
        synthetic = named
    loaded: dict[str, ImageSet | None] = {}
    errors: dict[str, str] = {}

    def load(name: str, src: str | Path, **kw: Any) -> None:
        try:
            loaded[name] = load_image_set(src, name, strict=strict, spatial_dims=spatial_dims, plane=plane, **kw)
        except InputError as err:
            if strict:
                raise
            loaded[name] = None
            errors[name] = str(err)

    if train is not None:
        load("train", train, layout=layout, subject_regex=subject_regex, split=train_split)
    if val is not None:
        load("val", val, layout=layout, subject_regex=subject_regex, split=val_split)
    for name, src in synthetic.items():
        load(name, src)
    report = check_sets(
        loaded.get("train"), loaded.get("val"), {k: v for k, v in loaded.items() if k not in ("train", "val") and v}
    )
    for name, msg in errors.items():
        report.errors[name] = msg
        report.roles.setdefault(name, "synthetic" if name not in ("train", "val") else name)
    return report

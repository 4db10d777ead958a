"""Find the images of one set (folder, CSV manifest, NIH ChestX-ray14, MRNet-v1.0), validate each, know its patient.

:func:`load_image_set` is the single entry point: it discovers candidate files for a layout, opens every one once
through MONAI ``LoadImage`` (:func:`memscan.data.readers.probe_image`), and returns an :class:`ImageSet` of usable
records plus a ``skipped`` table saying which files were left out and why. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from memscan.data.readers import COMPANION_SUFFIXES, ImageInfo, format_of, image_suffix, probe_image_cached
from memscan.data.subjects import compile_subject_regex, default_subject, dicom_patient_id, subject_from_regex
from memscan.errors import InputError

__all__ = [
    "LAYOUTS",
    "MRNET_PLANES",
    "NIH_CSV",
    "ImageSet",
    "Candidate",
    "detect_layout",
    "discover",
    "load_image_set",
    "SKIPPED_COLUMNS",
    "records_to_manifest",
]

logger = logging.getLogger("memscan.data")

LAYOUTS = ("auto", "folder", "manifest", "nih", "mrnet")
MRNET_PLANES = ("axial", "coronal", "sagittal")
MRNET_SPLITS = ("train", "valid")
MRNET_TASKS = ("abnormal", "acl", "meniscus")
NIH_CSV = "Data_Entry_2017.csv"
NIH_SPLIT_LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
MANIFEST_NAME = "manifest.csv"
SKIPPED_COLUMNS = ["set", "path", "reason", "row"]
_MAX_SKIP_LINES = 20
_RESERVED = {"image", "path", "subject_id", "set"}


@dataclass
class Candidate:
    """A file (or DICOM series folder) found by discovery, before validation."""

    image: str
    subject_id: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    row: int | None = None


@dataclass
class ImageSet:
    """The usable images of one named set and what was skipped.

    Attributes:
        name: set name (``train``, ``val``, a synthetic set's name).
        records: one dict per usable image: ``image`` (path), ``subject_id``, ``set`` and extra manifest columns.
        skipped: DataFrame with columns ``set, path, reason, row`` (row: 1-based data row of a manifest, else empty).
        spatial_dims: 2 or 3.
        infos: :class:`~memscan.data.readers.ImageInfo` per record (shape, spacing, content hash).
        source: what the set was loaded from.
        layout: the layout used.
    """

    name: str
    records: list[dict[str, Any]]
    skipped: pd.DataFrame
    spatial_dims: int
    infos: list[ImageInfo]
    source: str = ""
    layout: str = ""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def paths(self) -> list[str]:
        """Image paths in record order."""
        return [r["image"] for r in self.records]

    @property
    def shapes(self) -> dict[tuple[int, ...], int]:
        """Spatial shape -> number of images, most common first (MONAI axis order x, y[, z]: width first for
        PNG/JPEG)."""
        return dict(Counter(i.spatial_shape for i in self.infos).most_common())

    @property
    def spacings(self) -> dict[tuple[float, ...], int]:
        """Voxel spacing -> number of images, most common first."""
        return dict(Counter(i.spacing for i in self.infos).most_common())

    @property
    def subjects(self) -> list[str]:
        """Sorted unique subject ids."""
        return sorted({str(r["subject_id"]) for r in self.records})

    @property
    def hashes(self) -> list[str]:
        """Decoded-pixel content hash per record."""
        return [i.content_hash for i in self.infos]


def _skipped_frame(rows: Sequence[tuple[str, str, str, int | None]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=SKIPPED_COLUMNS)
    frame["row"] = frame["row"].astype("Int64")
    return frame


# ---------------------------------------------------------------------------------------------- layout detection


def _is_mrnet_root(p: Path) -> bool:
    return any((p / s / plane).is_dir() for s in MRNET_SPLITS for plane in MRNET_PLANES)


def _is_mrnet_split(p: Path) -> bool:
    return p.name in MRNET_SPLITS and any((p / plane).is_dir() for plane in MRNET_PLANES)


def detect_layout(source: str | Path) -> str:
    """Guess the layout of ``source``: ``manifest`` (a ``.csv`` file or a folder with ``manifest.csv``), ``nih``
    (``Data_Entry_2017.csv``), ``mrnet`` (``train|valid/{axial,coronal,sagittal}``) or ``folder``.

    Raises:
        InputError: ``source`` does not exist.
    """
    p = Path(source)
    if not p.exists():
        raise InputError(source, "not found")
    if p.is_file():
        if p.name == NIH_CSV:
            return "nih"
        return "manifest" if p.suffix.lower() == ".csv" else "folder"
    if (p / NIH_CSV).is_file():
        return "nih"
    if _is_mrnet_root(p) or _is_mrnet_split(p):
        return "mrnet"
    if (p / MANIFEST_NAME).is_file():
        return "manifest"
    return "folder"


# ---------------------------------------------------------------------------------------------- folder


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def _dicom_headers(files: Sequence[Path]) -> dict[Path, Any]:
    import pydicom

    headers: dict[Path, Any] = {}
    for f in files:
        try:
            headers[f] = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # unreadable header: validated (and reported) as a single file
            headers[f] = None
    return headers


def _group_dicom(folder: Path, files: list[Path], n_in_folder: int) -> tuple[list[Candidate], list[tuple]]:
    """One candidate per 2D/multi-frame file, or one per folder holding exactly one multi-slice series."""
    headers = _dicom_headers(files)
    series: dict[str, list[Path]] = defaultdict(list)
    for f, h in headers.items():
        # a volume slice has a position in space and one frame; radiographs and multi-frame files stand alone
        if h is not None and getattr(h, "ImagePositionPatient", None) is not None and int(
            getattr(h, "NumberOfFrames", 1) or 1
        ) == 1 and getattr(h, "SeriesInstanceUID", None):
            series[str(h.SeriesInstanceUID)].append(f)
    volumes = {uid: fs for uid, fs in series.items() if len(fs) > 1}
    in_volume = {f for fs in volumes.values() for f in fs}
    cands: list[Candidate] = []
    skipped: list[tuple] = []

    def pid(h: Any) -> str | None:
        value = str(getattr(h, "PatientID", "") or "").strip() if h is not None else ""
        return value or None

    if len(volumes) == 1 and len(in_volume) == n_in_folder:
        first = sorted(in_volume)[0]
        cands.append(Candidate(str(folder), pid(headers[first])))
        return cands, skipped
    for f in files:
        if f in in_volume:
            skipped.append(
                (
                    str(f),
                    f"slice of a DICOM series sharing folder {folder} with other files; "
                    "put each series in its own folder",
                    None,
                )
            )
        else:
            cands.append(Candidate(str(f), pid(headers[f])))
    return cands, skipped


def _discover_folder(root: Path) -> tuple[list[Candidate], list[tuple]]:
    if root.is_file():
        return [Candidate(str(root))], []
    files = _walk(root)
    headers_present = {
        (f.parent, default_subject(f)) for f in files if image_suffix(f) in (".mhd", ".nhdr")
    }
    cands: list[Candidate] = []
    skipped: list[tuple] = []
    dicom_dirs: dict[Path, list[Path]] = defaultdict(list)
    per_dir: Counter[Path] = Counter(f.parent for f in files)
    for f in files:
        suffix = image_suffix(f)
        if suffix in COMPANION_SUFFIXES:
            if (f.parent, default_subject(f)) not in headers_present:
                skipped.append((str(f), "raw pixel data without a .mhd/.nhdr header next to it", None))
            else:
                per_dir[f.parent] -= 1
            continue
        if f.name.upper() == "DICOMDIR":
            skipped.append((str(f), "DICOMDIR index file (holds no pixels; its images are read directly)", None))
            per_dir[f.parent] -= 1
            continue
        fmt = format_of(f)
        if fmt is None:
            skipped.append((str(f), f"unsupported format '{suffix or '(no suffix)'}'", None))
        elif fmt == "dicom":
            dicom_dirs[f.parent].append(f)
        else:
            cands.append(Candidate(str(f)))
    for folder, dfiles in dicom_dirs.items():
        c, s = _group_dicom(folder, dfiles, per_dir[folder])
        cands.extend(c)
        skipped.extend(s)
    cands.sort(key=lambda c: c.image)
    return cands, skipped


# ---------------------------------------------------------------------------------------------- manifest


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")  # BOM from Excel
    except Exception as err:  # pandas raises several parser / decode errors
        raise InputError(path, f"cannot read CSV ({type(err).__name__}: {' '.join(str(err).split())[:160]})") from None


def _discover_manifest(csv_path: Path) -> tuple[list[Candidate], list[tuple]]:
    if csv_path.is_dir():
        csv_path = csv_path / MANIFEST_NAME
    df = _read_csv(csv_path)
    df.columns = [str(c).strip() for c in df.columns]
    lower = {c.lower(): c for c in df.columns}
    df = df.rename(columns={lower[k]: k for k in ("path", "subject_id") if k not in df.columns and k in lower})
    if "path" not in df.columns:
        raise InputError(csv_path, f"manifest needs a 'path' column (found: {', '.join(df.columns) or 'none'})")
    base = csv_path.parent
    extra_cols = [c for c in df.columns if c not in _RESERVED]
    cands: list[Candidate] = []
    skipped: list[tuple] = []
    for i, row in enumerate(df.to_dict("records"), start=1):
        raw = str(row["path"]).strip()
        if not raw:
            skipped.append((str(csv_path), "empty 'path' cell", i))
            continue
        p = Path(raw).expanduser()
        if not p.is_absolute():
            p = base / p
        if not p.exists():
            skipped.append((str(p), f"file not found (listed in {csv_path.name})", i))
            continue
        subject = str(row.get("subject_id", "")).strip() or None
        cands.append(Candidate(str(p), subject, {c: row[c] for c in extra_cols}, i))
    return cands, skipped


# ---------------------------------------------------------------------------------------------- NIH ChestX-ray14


def _discover_nih(source: Path, split: str | None) -> tuple[list[Candidate], list[tuple]]:
    root = source.parent if source.is_file() else source
    csv_path = root / NIH_CSV
    df = _read_csv(csv_path)
    for col in ("Image Index", "Patient ID"):
        if col not in df.columns:
            raise InputError(csv_path, f"missing column '{col}' (not an NIH ChestX-ray14 Data_Entry_2017.csv)")
    keep: set[str] | None = None
    if split is not None:
        if split not in NIH_SPLIT_LISTS:
            raise InputError(
                "--split", f"NIH ChestX-ray14 split must be one of {sorted(NIH_SPLIT_LISTS)}, got {split!r}"
            )
        list_path = root / NIH_SPLIT_LISTS[split]
        if not list_path.is_file():
            raise InputError(list_path, f"not found; needed for split {split!r}")
        keep = {line.strip() for line in list_path.read_text().splitlines() if line.strip()}
    on_disk: dict[str, Path] = {}
    for d in sorted(root.glob("images*")):
        if d.is_dir():
            for f in _walk(d):
                on_disk.setdefault(f.name, f)
    rename = {
        "Finding Labels": "finding_labels",
        "Follow-up #": "follow_up",
        "Patient Age": "patient_age",
        "Patient Gender": "patient_gender",
        "View Position": "view_position",
    }
    cands: list[Candidate] = []
    skipped: list[tuple] = []
    listed: set[str] = set()
    for i, row in enumerate(df.to_dict("records"), start=1):
        name = str(row["Image Index"]).strip()
        listed.add(name)
        if keep is not None and name not in keep:
            continue
        f = on_disk.get(name)
        if f is None:
            skipped.append((str(root / "images" / name), f"listed in {NIH_CSV} but not found under images*/", i))
            continue
        extras = {new: row[old] for old, new in rename.items() if old in row}
        cands.append(Candidate(str(f), str(row["Patient ID"]).strip() or None, extras, i))
    for name, f in sorted(on_disk.items()):
        if name not in listed:
            skipped.append((str(f), f"not listed in {NIH_CSV}", None))
    return cands, skipped


# ---------------------------------------------------------------------------------------------- MRNet-v1.0


def _mrnet_labels(root: Path, split: str) -> dict[str, dict[str, str]]:
    labels: dict[str, dict[str, str]] = defaultdict(dict)
    for task in MRNET_TASKS:
        path = root / f"{split}-{task}.csv"
        if not path.is_file():
            continue
        try:
            df = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
        except Exception as err:  # pandas raises several parser errors
            raise InputError(path, f"cannot read MRNet label CSV ({type(err).__name__})") from None
        if df.shape[1] < 2:
            raise InputError(path, "MRNet label CSV needs two columns: case, label")
        for case, label in zip(df[0], df[1]):
            labels[str(case).strip().zfill(4)][task] = str(label).strip()
    return labels


def _discover_mrnet(source: Path, plane: str, split: str | None) -> tuple[list[Candidate], list[tuple]]:
    if plane not in MRNET_PLANES:
        raise InputError("--plane", f"MRNet plane must be one of {', '.join(MRNET_PLANES)}, got {plane!r}")
    if _is_mrnet_split(source) and not _is_mrnet_root(source):
        root, splits = source.parent, [source.name]
        if split is not None and split != source.name:
            raise InputError(source, f"is the MRNet {source.name!r} folder but split {split!r} was asked for")
    else:
        root = source
        if split is not None and split not in MRNET_SPLITS:
            raise InputError("--split", f"MRNet split must be one of {', '.join(MRNET_SPLITS)}, got {split!r}")
        splits = [split] if split else [s for s in MRNET_SPLITS if (root / s).is_dir()]
    cands: list[Candidate] = []
    skipped: list[tuple] = []
    for s in splits:
        folder = root / s / plane
        if not folder.is_dir():
            raise InputError(folder, f"missing MRNet folder for split {s!r}, plane {plane!r}")
        labels = _mrnet_labels(root, s)
        for f in _walk(folder):
            if image_suffix(f) != ".npy":
                reason = f"unsupported format '{image_suffix(f) or '(no suffix)'}' in MRNet folder"
                skipped.append((str(f), reason, None))
                continue
            case = default_subject(f)
            extras = {"split": s, "plane": plane, **{t: labels.get(case, {}).get(t, "") for t in MRNET_TASKS}}
            # MRNet publishes exam ids only (one exam per id); the exam id is the best patient key available
            cands.append(Candidate(str(f), case, extras))
    return cands, skipped


# ---------------------------------------------------------------------------------------------- entry points


def discover(
    source: str | Path, layout: str = "auto", *, plane: str = "sagittal", split: str | None = None
) -> tuple[str, list[Candidate], list[tuple]]:
    """List the candidate images of ``source`` without opening their pixels.

    Returns:
        ``(layout, candidates, skipped)`` where skipped rows are ``(path, reason, row)``.

    Raises:
        InputError: unknown layout, missing source, unreadable manifest or missing layout files.
    """
    if layout not in LAYOUTS:
        raise InputError("--layout", f"must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    p = Path(source).expanduser()
    if not p.exists():
        raise InputError(source, "not found")
    if layout == "auto":
        layout = detect_layout(p)
    if split is not None and layout in ("folder", "manifest"):
        raise InputError("--split", f"only the nih and mrnet layouts have official splits (layout is {layout!r})")
    if layout == "folder":
        cands, skipped = _discover_folder(p)
    elif layout == "manifest":
        cands, skipped = _discover_manifest(p)
    elif layout == "nih":
        cands, skipped = _discover_nih(p, split)
    else:
        cands, skipped = _discover_mrnet(p, plane, split)
    return layout, cands, skipped


def _probe_all(paths: Sequence[str], workers: int | None) -> list[ImageInfo | InputError]:
    def one(path: str) -> ImageInfo | InputError:
        try:
            return probe_image_cached(path)
        except InputError as err:
            return err

    n = workers if workers is not None else min(4, os.cpu_count() or 1)
    if n <= 1 or len(paths) < 4:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, paths))


def _log_skips(name: str, rows: Iterable[tuple[str, str, str, int | None]]) -> None:
    rows = list(rows)
    for _, path, reason, row in rows[:_MAX_SKIP_LINES]:
        where = f"{path} (row {row})" if row is not None else path
        logger.warning("[%s] skipped %s: %s", name, where, reason)
    if len(rows) > _MAX_SKIP_LINES:
        logger.warning("[%s] ... and %d more skipped files (see skipped.csv)", name, len(rows) - _MAX_SKIP_LINES)


def load_image_set(
    source: str | Path,
    name: str,
    *,
    layout: str = "auto",
    subject_regex: str | None = None,
    plane: str = "sagittal",
    split: str | None = None,
    strict: bool = False,
    spatial_dims: int | None = None,
    workers: int | None = None,
) -> ImageSet:
    """Discover, validate and identify the images of one set.

    Every candidate is opened once through MONAI ``LoadImage`` with explicit readers. Unusable files (corrupt,
    truncated, empty, not an image, unsupported, NaN/Inf, constant, unreadable, wrong dimensionality for the set,
    exact pixel duplicates inside the set) are skipped with one log line each and listed in ``ImageSet.skipped``.

    Subject ids, in order of precedence: ``subject_regex`` (searched in the path relative to ``source``), the
    manifest's ``subject_id`` column, the NIH ``Patient ID`` / MRNet exam id, the DICOM ``PatientID``, the file stem.

    Args:
        source: folder, CSV manifest, NIH ChestX-ray14 root or MRNet-v1.0 root (or one of its split folders).
        name: set name recorded in each record's ``set`` and in ``skipped``.
        layout: ``auto``, ``folder``, ``manifest``, ``nih`` or ``mrnet``.
        subject_regex: regex with a ``subject`` group (or one group) capturing the patient id from the path.
        plane: MRNet plane (``axial``, ``coronal``, ``sagittal``).
        split: NIH ``train_val``/``test`` or MRNet ``train``/``valid``; None for everything.
        strict: raise on the first unusable file instead of skipping it.
        spatial_dims: expected 2 or 3; None takes the majority of the set (the minority is skipped).
        workers: threads used to open files (default: up to 4).

    Returns:
        The :class:`ImageSet`.

    Raises:
        InputError: strict mode and an unusable file; the set is empty after skipping; bad arguments.
    """
    if spatial_dims not in (None, 2, 3):
        raise InputError("spatial_dims", f"must be 2 or 3, got {spatial_dims!r}")
    regex = compile_subject_regex(subject_regex)
    used_layout, cands, pre_skipped = discover(source, layout, plane=plane, split=split)
    root = Path(source).expanduser()
    root_dir = root if root.is_dir() else root.parent
    skipped: list[tuple[str, str, str, int | None]] = [(name, p, r, row) for p, r, row in pre_skipped]

    # subjects
    kept: list[Candidate] = []
    for c in cands:
        if regex is not None:
            try:
                rel = Path(c.image).resolve().relative_to(root_dir.resolve()).as_posix()
            except ValueError:
                rel = Path(c.image).as_posix()
            subject = subject_from_regex(regex, rel)
            if subject is None:
                skipped.append((name, c.image, f"subject regex {regex.pattern!r} does not match {rel!r}", c.row))
                continue
            c.subject_id = subject
        elif c.subject_id is None and format_of(c.image) == "dicom":
            c.subject_id = dicom_patient_id(c.image)
        if c.subject_id is None:
            c.subject_id = default_subject(c.image)
        kept.append(c)

    # validation: open each file once
    results = _probe_all([c.image for c in kept], workers)
    good: list[tuple[Candidate, ImageInfo]] = []
    for c, res in zip(kept, results):
        if isinstance(res, InputError):
            skipped.append((name, c.image, res.reason, c.row))
        else:
            good.append((c, res))

    # one dimensionality per set
    dims_count = Counter(info.spatial_dims for _, info in good)
    if spatial_dims is None and dims_count:
        top = dims_count.most_common()
        if len(top) > 1 and top[0][1] == top[1][1]:
            raise InputError(
                source, f"set '{name}' mixes 2D and 3D images equally ({dict(dims_count)}); pass spatial_dims"
            )
        spatial_dims = top[0][0]
    final: list[tuple[Candidate, ImageInfo]] = []
    first_by_hash: dict[str, str] = {}
    for c, info in good:
        if info.spatial_dims != spatial_dims:
            reason = f"{info.spatial_dims}D image (shape {info.spatial_shape}) in a {spatial_dims}D set"
            skipped.append((name, c.image, reason, c.row))
            continue
        dup = first_by_hash.get(info.content_hash)
        if dup is not None:
            skipped.append((name, c.image, f"exact duplicate of {dup} (same pixels) in set '{name}'", c.row))
            continue
        first_by_hash[info.content_hash] = c.image
        final.append((c, info))

    _log_skips(name, skipped)
    if strict and skipped:
        _, path, reason, row = skipped[0]
        more = f"; {len(skipped) - 1} more problem(s) in set '{name}'" if len(skipped) > 1 else ""
        raise InputError(path, f"{reason} (strict mode{more})", row)
    if not final:
        detail = f"; first: {skipped[0][1]}: {skipped[0][2]}" if skipped else ""
        raise InputError(source, f"set '{name}' has no usable images ({len(skipped)} skipped{detail})")
    records = []
    for c, _ in final:
        rec: dict[str, Any] = {"image": c.image, "subject_id": str(c.subject_id), "set": name}
        for k, v in c.extras.items():
            rec.setdefault(k, v)
        records.append(rec)
    return ImageSet(
        name=name,
        records=records,
        skipped=_skipped_frame(skipped),
        spatial_dims=int(spatial_dims),
        infos=[info for _, info in final],
        source=str(source),
        layout=used_layout,
    )


def records_to_manifest(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Manifest table for ``records``: ``path`` (absolute), ``subject_id``, then the extra columns.

    Written with :func:`memscan.io.write_csv_atomic`, it loads back with ``layout="manifest"``.
    """
    rows = []
    for r in records:
        row = {"path": str(Path(r["image"]).resolve()), "subject_id": r["subject_id"]}
        row.update({k: v for k, v in r.items() if k not in _RESERVED})
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["path", "subject_id"])

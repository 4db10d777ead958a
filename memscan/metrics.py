"""Memorization metrics: Pearson correlation, exact blockwise top-k, the threshold τ, statistics and bootstrap.

Method (Dar et al., "Unconditional latent diffusion models memorize patient imaging data", Nat. Biomed. Eng. 2025):

1. Pearson correlation between embedding vectors (equal to ``1 - scipy.spatial.distance.cdist(a, b, "correlation")``).
2. For each training sample its best correlation with the validation set (held-out real images of other
   patients); τ = the p-th percentile (default 95, numpy's ``"linear"`` interpolation) of those best values.
3. A training sample is *memorized* when its best synthetic correlation is > τ (``N_mem``); a synthetic sample
   is a *copy* when its best training correlation is > τ (``N_copies``).

Fractions: ``frac_memorized_train = N_mem / n_train`` and ``frac_copies_synthetic = N_copies / n_synthetic``.
The paper's notebook divided ``N_copies`` by the number of *training* samples; memscan divides by the number of
synthetic samples, which is the fraction of the generated data that are copies.

Precision: rows are centred and L2-normalised in float64, then the correlation products are computed in
``dtype``: float32 by default (agrees with scipy's float64 result to ~1e-6, tested within 1e-5; τ and the flags
can differ only for samples within that distance of τ), or ``dtype="float64"`` (agrees to ~1e-15). Values are
returned as float64 numpy arrays.

Correlations are computed block by block (never the whole N×M matrix); the block size follows the free memory
of the device (``/proc/meminfo`` or ``os.sysconf`` on the CPU, ``torch.cuda.mem_get_info`` on a GPU).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pickle  # noqa: S403 - only for its exception type; nothing is unpickled
import threading
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import pandas as pd
import torch

from memscan import __version__
from memscan.errors import InputError
from memscan.io import write_csv_atomic, write_json_atomic
from memscan.parallel import run_concurrently

__all__ = [
    "resolve_device",
    "pearson",
    "topk_correlation",
    "best_matches",
    "blend_correlation",
    "best_of_correlation",
    "scale_to_null",
    "with_headroom",
    "percentile",
    "calibrate_threshold",
    "match",
    "MatchResult",
    "Refine",
    "load_embeddings",
    "load_embedding_sets",
    "load_labels",
    "validate_embeddings",
]

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]
T = TypeVar("T", float, np.ndarray, torch.Tensor)
#: ``refine(query_set, query_rows, reference_set, candidates, feature_correlations) -> (best_score, best_index)``:
#: set names ``"train"``/``"val"``/``"synthetic"``, the query rows (indices into their set), ``[n, k]`` candidate
#: indices into the reference set (``-1`` = none) with their ``[n, k]`` feature correlations; returns each query's
#: best score and the reference index reaching it (``-inf`` / ``-1`` without a candidate). A refine that scores each
#: pair in R ways returns ``[n, R]`` arrays (each way's best over the candidates): R sets of :func:`match`'s
#: ``best_of``, each on its own τ_b. See :func:`match`.
Refine = Callable[[str, np.ndarray, str, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

_CPU_TILE_CAP = 1 << 21  # 2M elements (8 MB in float32) per worker: measured best of 512-2048-row tiles (bench_metrics)
_GPU_TILE_CAP = 1 << 28  # 256M elements (1 GiB in float32)
_STANDARDIZE_CHUNK = 2048  # rows standardised at a time: the float64 temporary stays in cache (measured 2048 best)
_HASH_CHUNK = 1 << 14  # rows hashed / compared at a time in the duplicate search
_CHUNK = 128  # CPU search: maxima of chunks of this many values, then the first maximum inside one chunk


# ----------------------------------------------------------------------------------------------------------------
# devices, dtypes, memory
# ----------------------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"`` or ``None`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` into a device.

    Raises:
        InputError: for an unknown device string or a CUDA device that is not available.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = "auto" if device is None else str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as err:
            raise InputError("device", f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device", f"{dev} was requested but CUDA is not available (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError("device", f"{dev} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise InputError("device", f"unsupported device {dev} (use auto, cpu, cuda or cuda:N)")
    return dev


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    table = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
             torch.float64: torch.float64}
    if dtype not in table:
        raise InputError("dtype", f"unsupported dtype {dtype!r} (use float32 or float64)")
    return table[dtype]


def _free_memory_bytes(device: torch.device) -> int:
    """Free memory available to tiles on ``device`` (psutil is not a dependency, so read the OS directly)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def _chunk_aligned(block_size: int | tuple[int, int]) -> bool:
    """Whether given tile sizes are multiples of ``_CHUNK`` (such tiles stay aligned and use the chunked search)."""
    return all(int(b) % _CHUNK == 0 for b in np.atleast_1d(block_size))


def _block_shape(n: int, m: int, device: torch.device, dtype: torch.dtype,
                 block_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """Rows of query and reference per tile: explicit ``block_size`` or chosen from free memory."""
    if block_size is not None:
        bq, br = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
        if int(bq) < 1 or int(br) < 1:
            raise InputError("block_size", f"must be >= 1, got {block_size!r}")
        bq, br = int(bq), int(br)
        if _chunk_aligned((bq, br)):  # keep chunk-aligned tiles chunk-aligned (rows get padded)
            return min(bq, -(-n // _CHUNK) * _CHUNK), min(br, -(-m // _CHUNK) * _CHUNK)
        return min(n, bq), min(m, br)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # a tile, its comparison mask and top-k scratch: budget an eighth of free memory for it
    budget = _free_memory_bytes(device) // (8 * itemsize)
    cap = _GPU_TILE_CAP if device.type == "cuda" else _CPU_TILE_CAP
    elems = int(max(1 << 14, min(budget, cap)))
    row_block = 8192 if device.type == "cuda" else 1024
    c = _CHUNK  # tiles in multiples of _CHUNK rows (the CPU search reduces chunks of that many values)
    n_pad, m_pad = -(-n // c) * c, -(-m // c) * c
    br = min(m_pad, max(c, elems // min(n_pad, row_block) // c * c))
    bq = min(n_pad, max(c, elems // br // c * c))
    return bq, br


# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------
def validate_embeddings(array: ArrayLike, source: str | Path = "embeddings") -> np.ndarray:
    """Check that ``array`` is a usable embedding matrix and return it as a float numpy array.

    Checks: numeric, 2-D, at least one row and one column, every value finite, no row with zero variance
    (its correlation is undefined).

    Args:
        array: N×D embeddings (numpy array, torch tensor or nested sequence).
        source: file or set name used in error messages.

    Returns:
        The embeddings as a float32 or float64 numpy array (integers become float64).

    Raises:
        InputError: naming ``source`` and, for bad values, the first bad row.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    try:
        arr = np.asarray(array)
    except (ValueError, TypeError) as err:
        raise InputError(source, f"not a numeric array ({err})") from err
    if arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind != "f":
        raise InputError(source, f"embeddings must be real numbers, got dtype {arr.dtype}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise InputError(source, f"embeddings must be 2-D (samples × features), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise InputError(source, "no samples (0 rows)")
    if arr.shape[1] == 0:
        raise InputError(source, "embeddings have 0 features")
    lo, hi = _row_range(arr)  # NaN propagates into both, an infinity into one: a single pass checks both
    finite = np.isfinite(lo) & np.isfinite(hi)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise InputError(source, "embedding contains NaN or Inf", row=row)
    constant = lo == hi
    if constant.any():
        row = int(np.flatnonzero(constant)[0])
        raise InputError(source, "embedding has zero variance (all features equal): correlation is undefined",
                         row=row)
    return arr


def _row_range(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (min, max), NaN where the row holds a NaN (torch's ``amin`` and ``amax`` along rows: together
    about 6x as fast as numpy's, and 10x as fast as ``torch.aminmax``, on 10k x 128 float32)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays (memory maps): only read here
            rows = torch.from_numpy(arr)
            return rows.amin(dim=1).numpy(), rows.amax(dim=1).numpy()
    except (ValueError, RuntimeError, TypeError):  # layouts torch cannot view (negative strides)
        return arr.min(axis=1), arr.max(axis=1)


def load_embeddings(path: str | Path) -> np.ndarray:
    """Load and validate an embedding matrix from ``.npy``, ``.npz`` (exactly one array) or ``.pt`` (a tensor).

    Pickles are never executed: ``.npy``/``.npz`` load with ``allow_pickle=False`` and ``.pt`` with
    ``torch.load(weights_only=True)``.

    Raises:
        InputError: missing, unreadable, pickled or corrupt file, wrong content, or any check of
            :func:`validate_embeddings`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            with open(path, "rb") as fh:
                if fh.read(6) != b"\x93NUMPY":
                    raise InputError(path, "not a .npy array file (corrupt, truncated or another format)")
            array: Any = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with open(path, "rb") as fh:
                if fh.read(2) != b"PK":
                    raise InputError(path, "not a .npz archive (corrupt, truncated or another format)")
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if len(names) != 1:
                    raise InputError(path, f".npz must hold exactly one array, found {len(names)} ({names[:5]})")
                array = archive[names[0]]
        elif suffix in (".pt", ".pth"):
            with open(path, "rb") as fh:
                if fh.read(2)[:1] not in (b"P", b"\x80"):  # zip (torch.save) or legacy pickle stream
                    raise InputError(path, "not a torch .pt file (corrupt, truncated or another format)")
            array = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(array, torch.Tensor):
                raise InputError(path, f".pt file must hold a single tensor, found {type(array).__name__}")
            array = array.detach().to(torch.float64 if array.dtype == torch.float64 else torch.float32).numpy()
        else:
            raise InputError(path, f"unsupported file type {path.suffix!r} (use .npy, .npz or .pt)")
    except InputError:
        raise
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise InputError(path, "file holds pickled objects; refusing to load (save a plain numeric array)") \
                from err
        raise InputError(path, f"corrupt or unreadable file ({err})") from err
    except (OSError, EOFError, RuntimeError, zipfile.BadZipFile, TypeError, KeyError,
            pickle.UnpicklingError) as err:
        if "weights_only" in str(err):
            raise InputError(path, "file holds pickled Python objects, not a plain tensor; refusing to load") \
                from err
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(path, f"corrupt or unreadable file ({msg[:200]})") from err
    except Exception as err:  # noqa: BLE001 - any other decoder failure is a corrupt file, not a crash
        raise InputError(path, f"corrupt or unreadable file ({type(err).__name__})") from err
    return validate_embeddings(array, path)


def _check_dims(sets: Sequence[tuple[str | Path, np.ndarray]]) -> None:
    """All sets must share the first set's embedding dimension (the error names both sources)."""
    first_name, first = sets[0]
    for name, arr in sets[1:]:
        if arr.shape[1] != first.shape[1]:
            raise InputError(name, f"embedding dimension {arr.shape[1]} does not match {first_name} "
                                   f"(dimension {first.shape[1]})")


def load_embedding_sets(train: str | Path, val: str | Path, synthetic: str | Path
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load the train, validation and synthetic embedding files; check they share one dimension."""
    sets = [(path, load_embeddings(path)) for path in (train, val, synthetic)]
    _check_dims(sets)
    return sets[0][1], sets[1][1], sets[2][1]


def load_labels(path: str | Path, n: int, columns: Sequence[str] = ("subject", "subject_id", "patient_id"),
                ) -> np.ndarray:
    """Read one label per embedding row (subject ids or sample names) from a text or CSV file.

    ``.txt``/``.lst``: one label per line. ``.csv``/``.tsv``: the first of ``columns`` present in the header, or
    the only column (an audit's ``embeddings/<set>.files.csv`` lists files in its ``image`` column).

    Args:
        path: the label file.
        n: number of embedding rows it must label.
        columns: preferred column names, in order.

    Returns:
        An object array of ``n`` strings.

    Raises:
        InputError: missing or unreadable file, no usable column, empty labels, or a count other than ``n``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "label file not found")
    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str,
                                keep_default_na=False)
            name = next((c for c in columns if c in table.columns), None)
            if name is None and len(table.columns) == 1:
                name = table.columns[0]
            if name is None:
                raise InputError(path, f"no column named {' or '.join(columns)} among {list(table.columns)}")
            labels = table[name].str.strip().to_numpy(dtype=object)
        else:
            text = path.read_text(encoding="utf-8")
            labels = np.array([line.strip() for line in text.splitlines() if line.strip()], dtype=object)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as err:
        raise InputError(path, f"not a readable text/CSV label file ({type(err).__name__})") from err
    empty = np.flatnonzero(labels == "")
    if len(empty):
        raise InputError(path, "empty label", row=int(empty[0]))
    if len(labels) != n:
        raise InputError(path, f"has {len(labels)} labels for {n} embedding rows")
    return labels


def _group_codes(query_groups: ArrayLike | None, reference_groups: ArrayLike | None, n: int, m: int,
                 names: tuple[str, str] = ("query_groups", "reference_groups"),
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Map two arrays of subject ids (strings or ints) onto shared int64 codes; None unless both are given."""
    if query_groups is None or reference_groups is None:
        return None, None
    q = np.asarray(query_groups, dtype=object).ravel()
    r = np.asarray(reference_groups, dtype=object).ravel()
    for arr, size, name in ((q, n, names[0]), (r, m, names[1])):
        if len(arr) != size:
            raise InputError(name, f"has {len(arr)} subject ids for {size} embeddings")
    codes, _uniques = pd.factorize(np.concatenate([q, r]), use_na_sentinel=False)
    return codes[:n].astype(np.int64), codes[n:].astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# correlation and search
# ----------------------------------------------------------------------------------------------------------------
def _standardize(x: ArrayLike, device: torch.device, dtype: torch.dtype, pad_to: int = 1) -> torch.Tensor:
    """Centre each row and scale it to unit L2 norm (in float64), so a matrix product gives Pearson r.

    Chunked (bounds the float64 temporary) and in place on CPU tensors; zero rows are appended up to a multiple
    of ``pad_to`` (the search masks them).
    """
    if not isinstance(x, torch.Tensor):  # torch views C-ordered writeable arrays; others (reversed, memmap) copy
        x = torch.from_numpy(np.require(np.asarray(x), requirements=["C", "W"]))
    out = torch.empty((-(-x.shape[0] // pad_to) * pad_to, x.shape[1]), dtype=dtype, device=device)
    out[x.shape[0]:] = 0
    for start in range(0, x.shape[0], _STANDARDIZE_CHUNK):
        chunk = x[start:start + _STANDARDIZE_CHUNK].detach().to(device="cpu", dtype=torch.float64, copy=True)
        chunk -= chunk.mean(dim=1, keepdim=True)
        chunk /= torch.linalg.vector_norm(chunk, dim=1, keepdim=True)
        out[start:start + len(chunk)] = chunk.to(device=device, dtype=dtype)
    return out


def pearson(a: ArrayLike, b: ArrayLike, device: str | torch.device = "auto",
            dtype: str | torch.dtype = "float32") -> torch.Tensor:
    """Dense Pearson correlation matrix between the rows of ``a`` (N×D) and ``b`` (M×D).

    Equal to ``1 - scipy.spatial.distance.cdist(a, b, "correlation")``. Holds the whole N×M matrix: use
    :func:`topk_correlation` for large sets.

    Returns:
        N×M tensor on ``device`` in ``dtype``.
    """
    dev, dt = resolve_device(device), _resolve_dtype(dtype)
    a_arr, b_arr = validate_embeddings(a, "a"), validate_embeddings(b, "b")
    _check_dims([("a", a_arr), ("b", b_arr)])
    return _standardize(a_arr, dev, dt) @ _standardize(b_arr, dev, dt).T


def _tile_topk(tile: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each tile row ordered by (value desc, column asc): exact tie-breaking to the lowest column.

    ``torch.topk`` picks an arbitrary member of a tie at the k-th value, so rows with such a tie are redone with
    a stable descending sort (rare on real data; all rows only for degenerate inputs).
    """
    vals, idx = torch.topk(tile, k, dim=1, largest=True, sorted=True)
    ambiguous = (tile >= vals[:, -1:]).sum(dim=1) > k
    if bool(ambiguous.any()):
        rows = torch.nonzero(ambiguous).squeeze(1)
        svals, sidx = torch.sort(tile[rows], dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = svals[:, :k], sidx[:, :k]
    # order equal values by column: sort by column, then stable sort by value (descending)
    order = torch.argsort(idx, dim=1)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order)


def _update_best(tile: torch.Tensor, best_v: torch.Tensor, best_i: torch.Tensor | None, offset: int, dim: int,
                 chunk: int) -> None:
    """Merge a tile's maxima along ``dim`` into running (value, index) vectors, in place.

    A tile replaces a running value only when strictly greater, and within a tile the first maximum is taken,
    so ties keep the lowest index. On the GPU (``chunk == 0``) ``max`` with indices is fast. On the CPU a
    reduction with indices costs several times one without, so with ``chunk > 0`` (chunk-aligned tiles) one pass
    takes the maxima of chunks of ``chunk`` values and ``best_i`` receives the global index of the first chunk
    holding the maximum (:func:`_locate_in_chunks` finds the position inside it once the search is done); with
    ``chunk < 0`` (tiles of any shape) indices come from the tile's first maxima, for the lines that improved.
    ``best_i=None``: values only.
    """
    if best_i is None:  # values only
        torch.maximum(best_v, tile.amax(dim=dim), out=best_v)
        return
    if chunk == 0:
        v, i = tile.max(dim=dim)
        better = v > best_v
        best_v.copy_(torch.where(better, v, best_v))
        best_i.copy_(torch.where(better, i + offset, best_i))
        return
    if chunk > 0:  # chunk maxima (lines × chunks, or chunks × lines for columns) in one pass over the tile
        if dim == 1:
            chunk_max = tile.view(tile.shape[0], -1, chunk).amax(dim=2)
        else:
            chunk_max = tile.view(-1, chunk, tile.shape[1]).amax(dim=1)
        v, c = chunk_max.max(dim=dim)  # small: a chunk's worth of values per line
        better = v > best_v
        torch.maximum(best_v, v, out=best_v)  # equal values keep the running index: only ``better`` moves it
        torch.where(better, c.add_(offset // chunk), best_i, out=best_i)
        return
    v = tile.amax(dim=dim)
    lines = torch.nonzero(v > best_v).squeeze(1)
    if lines.numel() == 0:
        return
    if lines.numel() == v.numel():
        i = tile.max(dim=dim).indices
    else:
        i = tile.index_select(1 - dim, lines).max(dim=dim).indices
    best_v[lines] = v[lines]
    best_i[lines] = i + offset


def _locate_in_chunks(query: torch.Tensor, reference: torch.Tensor, best_c: torch.Tensor, chunk: int, m: int,
                      q_codes: torch.Tensor | None, r_codes: torch.Tensor | None) -> torch.Tensor:
    """Reference index of each query line's maximum, given the first ``chunk``-row block of ``reference`` holding
    it (``best_c``, ``-1`` where every pair was excluded): the line's products with that block are computed again
    (lines grouped by block, one small matmul each) and the first maximum taken. Padding rows (``>= m``) and
    excluded pairs count as -inf, as in the tiles.
    """
    # locating maxima afterwards costs ~n*chunk*d FLOPs; tracking them per tile cost ~25% of the search
    out = torch.full_like(best_c, -1)
    lines = torch.nonzero(best_c >= 0).squeeze(1)
    if lines.numel() == 0:
        return out
    blocks = best_c[lines]
    order = torch.argsort(blocks, stable=True)
    lines, blocks = lines[order], blocks[order]
    ids, counts = torch.unique_consecutive(blocks, return_counts=True)
    sorted_q = query.index_select(0, lines)  # one gather; the loop then takes contiguous slices
    position = torch.empty_like(lines)
    best = torch.empty(len(lines), dtype=query.dtype, device=query.device)
    start = 0
    for c, count in zip(ids.tolist(), counts.tolist()):
        end = start + count
        products = sorted_q[start:end] @ reference[c * chunk:(c + 1) * chunk].T
        if (c + 1) * chunk > m:
            products[:, m - c * chunk:] = -math.inf
        if q_codes is not None and r_codes is not None:
            products.masked_fill_(q_codes[lines[start:end], None] == r_codes[None, c * chunk:(c + 1) * chunk],
                                  -math.inf)
        torch.max(products, dim=1, out=(best[start:end], position[start:end]))
        start = end
    out[lines] = blocks * chunk + position
    return out


def _search(q: torch.Tensor, r: torch.Tensor, k: int = 1, *, n: int, m: int, q_codes: np.ndarray | None = None,
            r_codes: np.ndarray | None = None, block: tuple[int, int], columns: bool = False, chunk: int = 0,
            indices: bool = True, workers: int = 1,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Blockwise exact search over standardised rows (``q``/``r`` may carry zero padding rows past n / m).

    Returns the top-k (value, reference index) of every query row and, when ``columns``, the best
    (value, query index) of every reference row, from the same tiles. Excluded and padding pairs count as -inf.
    Ties go to the lowest index: each worker visits its tiles in increasing index order, a later tile replaces a
    running value only when strictly greater, within a tile the first maximum wins, and the workers' column
    maxima are merged preferring the lower query index on equal values.

    ``workers > 1`` (CPU): that many threads take query row blocks from a shared counter, each running its ops
    single-threaded. Many small ops each synchronising all cores cost more than the matmul once other processes
    share the cores; independent workers need no per-op barrier (torch releases the GIL inside its kernels).
    """
    bq, br = block
    nq, nr = q.shape[0], r.shape[0]
    device, dtype = q.device, q.dtype
    k = int(min(k, m))
    row_v = torch.full((nq, k), -math.inf, dtype=dtype, device=device)
    row_i = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    qc = rc = None
    if q_codes is not None and r_codes is not None:  # padding rows get codes that match nothing
        qc = torch.full((nq,), -1, dtype=torch.int64, device=device)
        rc = torch.full((nr,), -2, dtype=torch.int64, device=device)
        qc[:n], rc[:m] = torch.as_tensor(q_codes, device=device), torch.as_tensor(r_codes, device=device)
    starts = iter(range(0, nq, bq))
    lock = threading.Lock()

    def work() -> tuple[torch.Tensor | None, torch.Tensor | None]:
        col_v = torch.full((nr,), -math.inf, dtype=dtype, device=device) if columns else None
        col_i = torch.full((nr,), -1, dtype=torch.int64, device=device) if columns else None
        buffer = torch.empty(bq * br, dtype=dtype, device=device)  # one tile, reused (allocation costs more than mm)
        while True:
            with lock:
                q0 = next(starts, None)
            if q0 is None:
                return col_v, col_i
            q1 = min(nq, q0 + bq)
            run_v, run_i = row_v[q0:q1], row_i[q0:q1]
            for r0 in range(0, nr, br):
                r1 = min(nr, r0 + br)
                tile = buffer[: (q1 - q0) * (r1 - r0)].view(q1 - q0, r1 - r0)
                torch.mm(q[q0:q1], r[r0:r1].T, out=tile)
                if qc is not None:
                    tile.masked_fill_(qc[q0:q1, None] == rc[None, r0:r1], -math.inf)
                if q1 > n:
                    tile[max(0, n - q0):].fill_(-math.inf)
                if r1 > m:
                    tile[:, max(0, m - r0):].fill_(-math.inf)
                if k == 1:
                    _update_best(tile, run_v[:, 0], run_i[:, 0] if indices else None, r0, dim=1, chunk=chunk)
                else:
                    kk = min(k, r1 - r0)
                    v, i = _tile_topk(tile, kk)
                    # running entries have lower indices than this tile's: concatenation is index-ordered in ties
                    cand_v = torch.cat([run_v, v], dim=1)
                    cand_i = torch.cat([run_i, i + r0], dim=1)
                    order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
                    run_v.copy_(cand_v.gather(1, order))
                    run_i.copy_(cand_i.gather(1, order))
                if columns:
                    _update_best(tile, col_v[r0:r1], col_i[r0:r1] if indices else None, q0, dim=0, chunk=chunk)

    workers = max(1, min(int(workers), -(-nq // bq)))
    results = run_concurrently([work] * workers, workers)
    in_chunks = chunk > 0 and k == 1 and indices  # running indices are chunk indices until located
    row_v, row_i = row_v[:n], row_i[:n]
    row_i[torch.isneginf(row_v)] = -1
    col_v = col_i = None
    if columns:
        col_v, col_i = results[0]
        for other_v, other_i in results[1:]:  # higher value wins; equal values: the lower query index (or chunk)
            take = (other_v > col_v) | ((other_v == col_v) & (other_i >= 0) & ((other_i < col_i) | (col_i < 0)))
            col_v = torch.where(take, other_v, col_v)
            col_i = torch.where(take, other_i, col_i)
        col_v, col_i = col_v[:m], col_i[:m]
        col_i[torch.isneginf(col_v)] = -1
    if in_chunks:  # the rows' and the columns' maxima located side by side, one worker each
        tasks = [functools.partial(_locate_in_chunks, q, r, row_i[:, 0], chunk, m, qc, rc)]
        if columns:
            tasks.append(functools.partial(_locate_in_chunks, r, q, col_i, chunk, n, rc, qc))
        located = run_concurrently(tasks, workers)
        row_i = located[0][:, None]
        col_i = located[1] if columns else col_i
    return row_v, row_i, col_v, col_i


def _unique_rows(x: np.ndarray, codes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows identical in value (and group code): ``(first, inverse)`` with ``first`` ascending.

    Identical vectors are exact ties, but a BLAS kernel may round their products differently in different
    tile shapes; searching each distinct vector once makes "ties go to the lowest index" exact.
    A 64-bit multiply-add hash of each row's bits (computed in chunks: no full copy) groups the rows; every row
    is then compared with its group's first row, and only on a hash collision the exact byte-key grouping runs.
    """
    n = len(x)
    lanes = x.shape[1] * x.dtype.itemsize // 8  # the row's bytes as 64-bit words (a float32 row of odd width: + 1)
    lanes += int(x.shape[1] * x.dtype.itemsize % 8 != 0)
    weights = np.random.default_rng(0x6D656D).integers(1, 2**63, size=lanes, dtype=np.uint64) | np.uint64(1)
    hashes = np.empty(n, dtype=np.uint64)
    for s in range(0, n, _HASH_CHUNK):
        block = x[s:s + _HASH_CHUNK]
        words = np.zeros((len(block), lanes * 8 // x.dtype.itemsize), dtype=x.dtype)
        np.add(block, 0.0, out=words[:, :x.shape[1]], dtype=x.dtype)  # + 0.0 maps -0.0 to 0.0 (equal values)
        hashes[s:s + _HASH_CHUNK] = (words.view(np.uint64) * weights).sum(axis=1)  # wraps modulo 2**64
    if codes is not None:
        hashes ^= codes.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    inverse, uniques = pd.factorize(hashes)  # codes in order of first appearance
    inverse = inverse.astype(np.int64, copy=False)
    if len(uniques) == n:  # the usual case: no duplicate
        return np.arange(n), inverse
    order = np.argsort(inverse, kind="stable")  # rows by code, each code's rows in index order
    first = order[np.r_[0, np.flatnonzero(np.diff(inverse[order])) + 1]]
    for s in range(0, n, _HASH_CHUNK):  # verify the groups: equal values (and codes) as the group's first row
        rep = first[inverse[s:s + _HASH_CHUNK]]
        same = (x[s:s + _HASH_CHUNK] == x[rep]).all(axis=1)
        if codes is not None:
            same &= codes[s:s + _HASH_CHUNK] == codes[rep]
        if not same.all():
            return _unique_rows_exact(x, codes)
    return first, inverse


def _unique_rows_exact(x: np.ndarray, codes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact grouping by the rows' bytes (memory-hungrier fallback for a hash collision)."""
    rows = np.ascontiguousarray(x + 0.0)  # + 0.0 maps -0.0 to 0.0
    key = rows.view(np.uint8).reshape(len(rows), -1)
    if codes is not None:
        key = np.concatenate([key, codes.astype("<i8").reshape(-1, 1).view(np.uint8)], axis=1)
    key = np.ascontiguousarray(key).view(np.dtype((np.void, key.shape[1]))).ravel()
    inverse = pd.factorize(key)[0].astype(np.int64)
    return np.unique(inverse, return_index=True)[1], inverse


def _expand_duplicates(values: np.ndarray, uidx: np.ndarray, first: np.ndarray, inverse: np.ndarray,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
    """Turn top-k over distinct reference vectors into top-k over all rows (duplicates by ascending index)."""
    if k == 1 or len(first) == len(inverse):
        return values[:, :k], np.where(uidx[:, :k] >= 0, first[np.maximum(uidx[:, :k], 0)], -1)
    order = np.argsort(inverse, kind="stable")  # rows grouped by distinct vector, ascending index inside
    starts = np.searchsorted(inverse[order], np.arange(len(first)))
    rank = np.arange(len(order)) - starts[inverse[order]]
    members = np.full((len(first), k), -1, dtype=np.int64)
    keep = rank < k
    members[inverse[order][keep], rank[keep]] = order[keep]
    cand_i = np.where(uidx[:, :, None] >= 0, members[np.maximum(uidx, 0)], -1).reshape(len(uidx), -1)
    cand_v = np.where(cand_i >= 0, np.repeat(values, k, axis=1), -np.inf)
    sort = np.lexsort((cand_i, -cand_v), axis=-1)[:, :k]  # value descending, then index ascending
    out_v, out_i = np.take_along_axis(cand_v, sort, 1), np.take_along_axis(cand_i, sort, 1)
    return out_v, np.where(np.isneginf(out_v), -1, out_i)


def _exact_search(query: np.ndarray, reference: np.ndarray, k: int, *, q_codes: np.ndarray | None,
                  r_codes: np.ndarray | None, device: torch.device, dtype: torch.dtype,
                  block_size: int | tuple[int, int] | None, columns: bool = False, indices: bool = True,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Validated numpy sets → exact top-k per query row (and best query per reference row when ``columns``).

    Returns float64 values and int64 indices (``-1`` where every pair was excluded; all ``-1`` for k=1 when
    ``indices`` is False, which skips locating the maxima).
    """
    if device.type != "cpu":
        chunk = 0
    elif block_size is None or _chunk_aligned(block_size):
        chunk = _CHUNK  # chosen tiles are always chunk-aligned; given ones when both sizes are
    else:
        chunk = -1
    pad = max(chunk, 1)

    def prepare(x: np.ndarray, codes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        first, inverse = _unique_rows(x, codes)
        distinct = x if len(first) == len(x) else x[first]  # no copy in the usual case
        return first, inverse, _standardize(distinct, device, dtype, pad)

    # in turn: side by side on one thread each measured slower (numpy's hashing holds the GIL, memory-bound steps)
    (q_first, q_inv, q_std), (r_first, r_inv, r_std) = prepare(query, q_codes), prepare(reference, r_codes)
    k_eff = int(min(k, len(r_first)))
    block = _block_shape(len(q_first), len(r_first), device, dtype, block_size)
    logger.debug("search %d x %d distinct vectors (k=%d) on %s in %s tiles of %d x %d", len(q_first), len(r_first),
                 k_eff, device, dtype, *block)
    rv, ri, cv, ci = _search(q_std, r_std, k_eff, n=len(q_first),
                             m=len(r_first), q_codes=None if q_codes is None else q_codes[q_first],
                             r_codes=None if r_codes is None else r_codes[r_first], block=block, columns=columns,
                             chunk=chunk, indices=indices or k_eff > 1,
                             workers=torch.get_num_threads() if device.type == "cpu" else 1)
    rv, ri = _expand_duplicates(rv.cpu().to(torch.float64).numpy(), ri.cpu().numpy(), r_first, r_inv,
                                int(min(k, len(reference))))
    col_v = col_i = None
    if columns:
        cv_np, ci_np = cv.cpu().to(torch.float64).numpy(), ci.cpu().numpy()
        col_v = cv_np[r_inv]
        col_i = np.where(ci_np >= 0, q_first[np.maximum(ci_np, 0)], -1)[r_inv]
    return rv[q_inv], ri[q_inv], col_v, col_i


def topk_correlation(query: ArrayLike, reference: ArrayLike, k: int = 1, *, query_groups: ArrayLike | None = None,
                     reference_groups: ArrayLike | None = None, device: str | torch.device = "auto",
                     block_size: int | tuple[int, int] | None = None, dtype: str | torch.dtype = "float32",
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k Pearson correlations of each query row among the reference rows, block by block.

    The N×M matrix is never held: tiles of ``block_size`` rows (chosen from free memory when None) are
    multiplied and their per-row top-k merged into a running top-k.

    Args:
        query: N×D embeddings.
        reference: M×D embeddings.
        k: neighbours per query row (``k > M`` is capped at M).
        query_groups: subject id per query row (strings or ints).
        reference_groups: subject id per reference row; when both group arrays are given, pairs with the same
            subject are excluded (a patient's other scans are not "other patients").
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        block_size: rows per tile, an int for both sides or ``(query_rows, reference_rows)``.
        dtype: ``"float32"`` (default) or ``"float64"`` for the products.

    Returns:
        ``(values, indices)``: float64 and int64 arrays of shape N×k, sorted by decreasing correlation; ties go
        to the lowest reference index. Where fewer than k references are allowed (exclusions), the missing
        entries have value ``-inf`` and index ``-1``.

    Raises:
        InputError: invalid embeddings, mismatched dimensions, bad ``k``/groups/device.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError("k", f"must be a positive integer, got {k!r}")
    dev, dt = resolve_device(device), _resolve_dtype(dtype)
    q_arr, r_arr = validate_embeddings(query, "query"), validate_embeddings(reference, "reference")
    _check_dims([("query", q_arr), ("reference", r_arr)])
    qc, rc = _group_codes(query_groups, reference_groups, len(q_arr), len(r_arr))
    values, indices, _, _ = _exact_search(q_arr, r_arr, int(k), q_codes=qc, r_codes=rc, device=dev, dtype=dt,
                                          block_size=block_size)
    return values, indices


def best_matches(query: ArrayLike, reference: ArrayLike, *, device: str | torch.device = "auto",
                 block_size: int | tuple[int, int] | None = None, dtype: str | torch.dtype = "float32",
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best match in both directions from one blockwise pass: each query's best reference and vice versa.

    Returns:
        ``(query_values, query_indices, reference_values, reference_indices)``: for every query row its highest
        correlation and the (lowest) reference index reaching it, and the same for every reference row.
    """
    dev, dt = resolve_device(device), _resolve_dtype(dtype)
    q_arr, r_arr = validate_embeddings(query, "query"), validate_embeddings(reference, "reference")
    _check_dims([("query", q_arr), ("reference", r_arr)])
    qv, qi, rv, ri = _exact_search(q_arr, r_arr, 1, q_codes=None, r_codes=None, device=dev, dtype=dt,
                                   block_size=block_size, columns=True)
    return qv[:, 0], qi[:, 0], rv, ri


def _blend_search(query: np.ndarray, reference: np.ndarray, *, q_codes: np.ndarray | None,
                  r_codes: np.ndarray | None, device: torch.device, dtype: torch.dtype,
                  block_size: int | tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated numpy sets → each query row's best fit by a blend of at most two reference rows.

    Greedy, two exact searches: the best reference, then the reference best correlated with what it leaves
    unexplained (the residual); the score is the multiple correlation of the query with the non-negative blend of
    the two, or the first reference's correlation when no positive blend improves on it. Returns float64 values,
    the first reference's index and the second's (``-1`` when the blend is the first reference alone).
    """
    search = dict(device=device, dtype=dtype, block_size=block_size)
    v1, i1, _, _ = _exact_search(query, reference, 1, q_codes=q_codes, r_codes=r_codes, **search)
    values, first, second = v1[:, 0].copy(), i1[:, 0], np.full(len(query), -1, dtype=np.int64)
    cpu64 = (torch.device("cpu"), torch.float64)
    for start in range(0, len(query), _STANDARDIZE_CHUNK):
        rows = np.arange(start, min(start + _STANDARDIZE_CHUNK, len(query)))
        rows = rows[first[rows] >= 0]
        if not len(rows):
            continue
        q = _standardize(query[rows], *cpu64).numpy()
        r1 = _standardize(reference[first[rows]], *cpu64).numpy()
        a = np.einsum("nd,nd->n", q, r1)
        resid = q - a[:, None] * r1  # orthogonal to the first reference: the search cannot pick it again
        live = np.linalg.norm(resid, axis=1) > 1e-6  # else the first reference explains the query exactly
        if not live.any():
            continue
        rows, q, r1, a, resid = rows[live], q[live], r1[live], a[live], resid[live]
        _, i2, _, _ = _exact_search(resid, reference, 1, q_codes=None if q_codes is None else q_codes[rows],
                                    r_codes=r_codes, **search)
        i2 = i2[:, 0]
        r2 = _standardize(reference[np.maximum(i2, 0)], *cpu64).numpy()
        b, g = np.einsum("nd,nd->n", q, r2), np.einsum("nd,nd->n", r1, r2)
        det = 1.0 - g * g
        with np.errstate(divide="ignore", invalid="ignore"):
            w1, w2 = (a - g * b) / det, (b - g * a) / det
            fit = np.sqrt(np.clip(a * w1 + b * w2, 0.0, 1.0))
        blended = (i2 >= 0) & (det > 1e-9) & (w1 > 0) & (w2 > 0) & (fit > values[rows])
        values[rows[blended]], second[rows[blended]] = fit[blended], i2[blended]
    return values, first, second


def blend_correlation(query: ArrayLike, reference: ArrayLike, *, query_groups: ArrayLike | None = None,
                      reference_groups: ArrayLike | None = None, device: str | torch.device = "auto",
                      block_size: int | tuple[int, int] | None = None, dtype: str | torch.dtype = "float32",
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query row's best Pearson correlation with a blend of at most two reference rows.

    A generator that memorised two training images can reproduce them superimposed: each source alone then
    correlates only partly with the sample, but their blend explains it. The blend is found greedily (the best
    reference, then the one best correlated with the part of the query it leaves unexplained) and weighted by least
    squares with non-negative weights; its score is the multiple correlation R of the query with the two, never
    below the best single correlation. Use it on both sides of a threshold (calibration and search), as
    :func:`match` does for its ``blend`` sets, since any query is explained a little better by two references.

    Args:
        query: N×D features.
        reference: M×D features.
        query_groups, reference_groups: subject ids; same-subject pairs are excluded (as :func:`topk_correlation`).
        device, block_size, dtype: as :func:`topk_correlation`.

    Returns:
        ``(values, first, second)``: float64 scores and int64 indices of the first source and of the second
        (``-1`` where the best fit is the first source alone, or where every pair is excluded: value ``-inf``).

    Raises:
        InputError: invalid features, mismatched dimensions, bad groups or device.
    """
    dev, dt = resolve_device(device), _resolve_dtype(dtype)
    q_arr, r_arr = validate_embeddings(query, "query"), validate_embeddings(reference, "reference")
    _check_dims([("query", q_arr), ("reference", r_arr)])
    qc, rc = _group_codes(query_groups, reference_groups, len(q_arr), len(r_arr))
    return _blend_search(q_arr, r_arr, q_codes=qc, r_codes=rc, device=dev, dtype=dt, block_size=block_size)


# ----------------------------------------------------------------------------------------------------------------
# percentile and threshold
# ----------------------------------------------------------------------------------------------------------------
def _percentile_rows(x: torch.Tensor, q: float) -> torch.Tensor:
    """numpy ``percentile(method="linear")`` of each row of a 2-D tensor via ``kthvalue``.

    Hand-written because ``torch.quantile`` refuses inputs over 2^24 elements.
    """
    n = x.shape[1]
    h = (n - 1) * (float(q) / 100.0)
    lo = int(math.floor(h))
    hi = min(lo + 1, n - 1)
    t = h - lo
    a = torch.kthvalue(x, lo + 1, dim=1).values.to(torch.float64)
    b = a if hi == lo else torch.kthvalue(x, hi + 1, dim=1).values.to(torch.float64)
    return _lerp(a, b, t)


def _lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """numpy's two-sided linear interpolation between neighbouring order statistics (agrees to the last bits)."""
    diff = b - a
    return a + diff * t if t < 0.5 else b - diff * (1.0 - t)


def _check_percentile(p: float, name: str = "percentile") -> float:
    try:
        p = float(p)
    except (TypeError, ValueError) as err:
        raise InputError(name, f"must be a number in [0, 100], got {p!r}") from err
    if not 0.0 <= p <= 100.0 or math.isnan(p):
        raise InputError(name, f"must be in [0, 100], got {p}")
    return p


def _check_headroom(headroom: float) -> float:
    """``headroom`` as a float in [0, 1) (see :func:`with_headroom`), else a one-line :class:`InputError`."""
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float, np.floating)) or not 0 <= headroom < 1:
        raise InputError("headroom", f"must be a number in [0, 1), got {headroom!r}")
    return float(headroom)


def percentile(values: ArrayLike, q: float) -> float:
    """The q-th percentile of ``values`` with numpy's default ``"linear"`` interpolation (any size)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise InputError("values", "percentile of an empty set")
    return _percentile_1d(x, _check_percentile(q))


def _percentile_1d(x: np.ndarray, q: float) -> float:
    return float(_percentile_rows(torch.as_tensor(x, dtype=torch.float64).reshape(1, -1), q)[0])


def _no_valid_row(best: np.ndarray, source: str, reason: str) -> None:
    bad = np.flatnonzero(np.isneginf(best))
    if bad.size:
        raise InputError(source, reason, row=int(bad[0]))


def calibrate_threshold(train: ArrayLike, val: ArrayLike, percentile: float = 95.0, *,
                        train_subjects: ArrayLike | None = None, val_subjects: ArrayLike | None = None,
                        device: str | torch.device = "auto", dtype: str | torch.dtype = "float32",
                        block_size: int | tuple[int, int] | None = None) -> float:
    """τ = the ``percentile``-th percentile of each training sample's best validation correlation.

    Args:
        train: training embeddings (N×D).
        val: validation embeddings of other patients (M×D).
        percentile: p in [0, 100], numpy ``"linear"`` interpolation.
        train_subjects, val_subjects: optional subject ids; same-subject pairs are excluded.
        device, dtype, block_size: as in :func:`topk_correlation`.

    Returns:
        τ as a float.
    """
    p = _check_percentile(percentile)
    dev, dt = resolve_device(device), _resolve_dtype(dtype)
    t_arr, v_arr = validate_embeddings(train, "train"), validate_embeddings(val, "val")
    _check_dims([("train", t_arr), ("val", v_arr)])
    tc, vc = _group_codes(train_subjects, val_subjects, len(t_arr), len(v_arr), ("train_subjects", "val_subjects"))
    values = _exact_search(t_arr, v_arr, 1, q_codes=tc, r_codes=vc, device=dev, dtype=dt, block_size=block_size,
                           indices=False)[0]
    _no_valid_row(values[:, 0], "train_subjects", "this training sample shares its subject with every validation "
                                                  "sample")
    return _percentile_1d(values[:, 0], p)


# ----------------------------------------------------------------------------------------------------------------
# match
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MatchResult:
    """Outcome of :func:`match`.

    Attributes:
        summary: the numbers (see :func:`match`), JSON-ready.
        train_table: one row per training sample: ``train_index``, ``best_synthetic_index``, ``correlation``,
            ``memorized`` (plus ``train_id`` / ``best_synthetic_id`` when labels were given).
        synthetic_table: one row per synthetic sample: ``synthetic_index``, ``best_train_index``,
            ``correlation``, ``best_validation_correlation``, ``margin`` (correlation − τ), ``copy``
            (plus ``synthetic_id`` / ``best_train_id`` when labels were given; with ``blend`` sets
            ``second_train_index`` / ``second_train_id``: a blended sample's other source, -1 / missing where its
            best score is not a blend of two).
        threshold: τ.
        best_val_for_train: each training sample's best validation correlation (the τ distribution).
        best_synthetic_for_train: each training sample's best synthetic correlation.
        best_train_for_synthetic: each synthetic sample's best training correlation.
        best_val_for_synthetic: each synthetic sample's best validation correlation.
        bootstrap: the bootstrap draws (``threshold``, ``frac_memorized_train``, ``frac_copies_synthetic``).
    """

    summary: dict[str, Any]
    train_table: pd.DataFrame
    synthetic_table: pd.DataFrame
    threshold: float
    best_val_for_train: np.ndarray
    best_synthetic_for_train: np.ndarray
    best_train_for_synthetic: np.ndarray
    best_val_for_synthetic: np.ndarray
    bootstrap: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dir(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``summary.json``, ``train_matches.csv`` and ``synthetic_matches.csv`` atomically (tmp + replace).

        Returns:
            The written paths by name.
        """
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(out, f"cannot create output folder ({err.strerror or err})") from err
        paths = {"summary": out / "summary.json", "train_matches": out / "train_matches.csv",
                 "synthetic_matches": out / "synthetic_matches.csv"}
        try:
            write_csv_atomic(self.train_table, paths["train_matches"])
            write_csv_atomic(self.synthetic_table, paths["synthetic_matches"])
            write_json_atomic(paths["summary"], self.summary)
        except OSError as err:
            raise InputError(out, f"cannot write results ({err.strerror or err})") from err
        return paths


def _labels(ids: ArrayLike | None, n: int, name: str) -> np.ndarray | None:
    if ids is None:
        return None
    arr = np.asarray(ids, dtype=object).ravel()
    if len(arr) != n:
        raise InputError(name, f"has {len(arr)} labels for {n} embeddings")
    return arr


def _split_halves(n_val: int, val_subjects: ArrayLike | None, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """Random split of the validation rows into halves A/B (by subject when subjects are given)."""
    if val_subjects is not None:
        codes, uniques = pd.factorize(np.asarray(val_subjects, dtype=object).ravel(), use_na_sentinel=False)
        if len(uniques) < 2:
            return None
        chosen = rng.permutation(len(uniques))[: len(uniques) // 2]
        in_a = np.isin(codes, chosen)
    else:
        if n_val < 2:
            return None
        in_a = np.zeros(n_val, dtype=bool)
        in_a[rng.permutation(n_val)[: n_val // 2]] = True
    return np.flatnonzero(in_a), np.flatnonzero(~in_a)


def _bootstrap(best_val_for_train: np.ndarray, best_syn_for_train: np.ndarray, best_train_for_syn: np.ndarray,
               percentile_: float, n_bootstrap: int, rng: np.random.Generator,
               headroom: float = 0.0) -> dict[str, np.ndarray]:
    """Bootstrap draws of τ and both fractions from the per-sample best-correlation vectors (no new correlations).

    Each draw resamples the training samples with replacement (their best validation and best synthetic
    correlations move together), recomputes τ* (raised by ``headroom``, see :func:`with_headroom`) and the memorized
    fraction on them, and draws the copy count as
    Binomial(n_synthetic, share of synthetic best-training correlations > τ*) — the exact distribution of a
    with-replacement resample of the synthetic set.

    Vectorised without sorting each resample: training samples are ranked by best validation correlation once;
    a draw picks ranks uniformly (= samples uniformly), its rank counts (``scatter_add``) and their running sum
    locate its order statistics (``searchsorted``), and the memorized count is the counts-weighted sum of the
    indicator — O(n) per draw in cheap operations, no per-draw sort or selection.
    """
    order = np.argsort(best_val_for_train, kind="stable")
    val_sorted = torch.as_tensor(best_val_for_train[order], dtype=torch.float64)
    syn_by_rank = torch.as_tensor(best_syn_for_train[order], dtype=torch.float64)
    syn_sorted = torch.sort(torch.as_tensor(best_train_for_syn, dtype=torch.float64)).values
    n, n_syn = len(order), syn_sorted.numel()
    h = (n - 1) * (percentile_ / 100.0)
    lo = int(math.floor(h))
    hi, t = min(lo + 1, n - 1), h - lo
    taus, mems, copies = [], [], []
    chunk = max(1, min(n_bootstrap, (1 << 23) // max(n, 1)))
    # buffers reused by every chunk: fresh 30-60 MB temporaries per chunk fragmented the heap (RSS +1.2 GB at 200k)
    counts_buf = torch.empty((chunk, n), dtype=torch.int32)
    running_buf = torch.empty((chunk, n), dtype=torch.int32)
    ones = torch.ones((chunk, n), dtype=torch.int32)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        ranks = torch.as_tensor(rng.integers(0, n, size=(b, n)))  # resampled sample = the one of this rank
        counts = counts_buf[:b].zero_().scatter_add_(1, ranks, ones[:b])
        del ranks
        running = torch.cumsum(counts, dim=1, dtype=torch.int32, out=running_buf[:b])
        at = torch.searchsorted(running, torch.tensor([[lo + 1, hi + 1]], dtype=torch.int32).repeat(b, 1))
        tau = with_headroom(_lerp(val_sorted[at[:, 0]], val_sorted[at[:, 1]], t), headroom)
        # memorized count of each draw: its counts over the ranks whose best synthetic correlation exceeds its τ*
        above_tau = running_buf[:b].copy_(syn_by_rank[None, :] > tau[:, None])
        mems.append((above_tau.mul_(counts)).sum(dim=1).to(torch.float64) / n)
        above = n_syn - torch.searchsorted(syn_sorted, tau, right=True)
        copies.append(torch.as_tensor(rng.binomial(n_syn, above.numpy() / n_syn) / n_syn, dtype=torch.float64))
        taus.append(tau)
    return {"threshold": torch.cat(taus).numpy(), "frac_memorized_train": torch.cat(mems).numpy(),
            "frac_copies_synthetic": torch.cat(copies).numpy()}


def _interval(draws: np.ndarray) -> list[float] | None:
    if draws.size == 0:
        return None
    x = torch.as_tensor(draws, dtype=torch.float64).reshape(1, -1)
    return [float(_percentile_rows(x, 2.5)[0]), float(_percentile_rows(x, 97.5)[0])]


def with_headroom(tau: T, headroom: float) -> T:
    """The decision threshold ``τ + headroom · (1 − τ)``: a copy must clear the share ``headroom`` of the way from
    the percentile threshold τ to an exact copy (correlation 1). 0 is Dar et al.'s rule. Floats, arrays, tensors."""
    return tau + headroom * (1.0 - tau)


def scale_to_null(values: ArrayLike, tau: float) -> np.ndarray:
    """Correlations of one feature set on the scale of :func:`match`'s ``best_of``: ``(r − τ_b) / (1 − τ_b)``, so the
    set's own threshold τ_b maps to 0 and an exact copy to 1 (−inf kept)."""
    return (np.asarray(values, dtype=np.float64) - tau) / max(1.0 - tau, 1e-12)


def _best_of_sets(values: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise best over feature sets and which set gave it (the first on ties)."""
    if len(values) == 1:
        return values[0], np.zeros(len(values[0]), dtype=np.int64)
    stacked = np.stack(values)
    which = np.argmax(stacked, axis=0)
    return np.take_along_axis(stacked, which[None], axis=0)[0], which


def _best_of_located(values: Sequence[np.ndarray], *indices: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """:func:`_best_of_sets` of ``values`` and, per element, the index from the set that gave it (one array per
    sequence in ``indices``, e.g. a blend's first and second source)."""
    best, which = _best_of_sets(values)
    return (best, *(np.choose(which, idx) for idx in indices))


def best_of_correlation(queries: Sequence[ArrayLike], references: Sequence[ArrayLike], thresholds: Sequence[float],
                        *, refined: tuple[ArrayLike, ArrayLike] | None = None, blend: Sequence[int] = (),
                        device: str | torch.device = "auto",
                        dtype: str | torch.dtype = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Each query's best reference on :func:`match`'s ``best_of`` score (e.g. for images scored after the match).

    Args:
        queries, references: one query and one reference feature set per score block, rows aligned across blocks.
        thresholds: each block's τ_b (``summary["feature_set_thresholds"]`` of the match).
        refined: for a match with ``refine``: each query's ``(best refine score, reference index)``, the first block
            (its τ_b is ``thresholds[0]``), or ``[n, R]`` arrays for a refine that scores in R ways (the first R
            blocks, ``thresholds[:R]``); ``queries`` and ``references`` then hold the ``best_of`` blocks.
        blend: indices into ``queries`` / ``references`` of blocks scored as blends (:func:`blend_correlation`),
            the match's ``blend`` sets (``summary["blended_sets"]``).

    Returns:
        ``(values, indices)``: per query the best scaled score over blocks and references, and the reference index
        of the block that gave it (the first block on ties, as in :func:`match`).

    Raises:
        InputError: mismatched blocks or row counts.
    """
    if refined is not None:
        r_values, r_index = (np.asarray(a).reshape(len(np.asarray(a)), -1) for a in refined)
    n_refined = 0 if refined is None else r_values.shape[1]
    n_blocks = len(queries) + n_refined
    if not len(queries) == len(references) or len(thresholds) != n_blocks or not n_blocks:
        raise InputError("best_of", f"needs one query set, reference set and threshold per block, got "
                                    f"{len(queries)}, {len(references)} and {len(thresholds)}"
                                    + (f" (plus {n_refined} refined block(s))" if refined is not None else ""))
    values, indices = [], []
    for j in range(n_refined):
        values.append(scale_to_null(r_values[:, j], float(thresholds[j])))
        indices.append(r_index[:, j].astype(np.int64))
    thresholds = thresholds[n_refined:]
    blend = {int(b) for b in blend}
    for b, (q, r, tau_b) in enumerate(zip(queries, references, thresholds)):
        if b in blend:
            v, i, _ = blend_correlation(q, r, device=device, dtype=dtype)
            v, i = v[:, None], i[:, None]
        else:
            v, i = topk_correlation(q, r, 1, device=device, dtype=dtype)
        if values and len(v) != len(values[0]):
            raise InputError("best_of", f"every block must hold the same queries, got {len(values[0])} and {len(v)}")
        values.append(scale_to_null(v[:, 0], float(tau_b)))
        indices.append(i[:, 0])
    return _best_of_located(values, indices)


def match(train_emb: ArrayLike, val_emb: ArrayLike, synthetic_emb: ArrayLike, percentile: float = 95.0,
          device: str | torch.device = "auto", *, train_subjects: ArrayLike | None = None,
          val_subjects: ArrayLike | None = None, n_bootstrap: int = 1000, seed: int = 0,
          train_ids: ArrayLike | None = None, synthetic_ids: ArrayLike | None = None,
          dtype: str | torch.dtype = "float32", block_size: int | tuple[int, int] | None = None,
          refine: Refine | None = None, refine_k: int = 5,
          best_of: Sequence[tuple[ArrayLike, ArrayLike, ArrayLike]] | None = None,
          null_views: Sequence[Sequence[ArrayLike]] | None = None, blend: Sequence[int] = (),
          headroom: float = 0.0) -> MatchResult:
    """Run the memorization test of Dar et al. on three embedding sets.

    τ = ``percentile``-th percentile (numpy "linear") of each training sample's best validation correlation;
    memorized training samples: best synthetic correlation > τ; copies: synthetic samples whose best training
    correlation > τ. ``frac_copies_synthetic = N_copies / n_synthetic`` (the paper's notebook divided by the
    number of training samples; memscan does not).

    Beyond the paper:

    * **Bootstrap** (``n_bootstrap`` draws, seeded): 95% percentile intervals for τ and both fractions. Draws
      resample the already-computed best-correlation vectors (see :func:`_bootstrap`); correlations are not
      recomputed, so the cost is negligible next to the search, and the interval reflects which samples were
      drawn, not how each sample's maximum would change with a different reference set.
    * **Null rate**: the validation set is split at random into halves A and B (by subject when
      ``val_subjects`` is given). τ_A is calibrated on A exactly as τ; ``null_rate`` is the fraction of training
      samples whose best correlation with B exceeds τ_A — B plays a "synthetic" set of new patients, so a
      trustworthy τ flags about (100 − p)% (``null_rate_expected``). ``null_rate_copies`` is the fraction of
      B samples whose best training correlation exceeds τ_A: the copy rate a generator of perfectly novel
      patients would get (not expected to equal (100 − p)%: it is a maximum over the training set).

    Args:
        train_emb, val_emb, synthetic_emb: N×D, M×D, S×D embeddings (numpy arrays or tensors).
        percentile: p in [0, 100].
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        train_subjects, val_subjects: subject ids; when both are given, same-subject train/validation pairs are
            excluded from calibration. ``val_subjects`` alone makes the null-rate split patient-disjoint.
        n_bootstrap: bootstrap draws (0 disables intervals).
        seed: seed of the bootstrap and the null split.
        train_ids, synthetic_ids: optional labels (e.g. file paths) added as columns to the tables.
        dtype: ``"float32"`` (default) or ``"float64"`` products.
        block_size: tile rows, see :func:`topk_correlation`.
        refine: optional re-scoring of retrieval candidates (see :data:`Refine`; e.g. the test-time alignment of
            :func:`memscan.scoring.align_and_correlate`): every best match above — calibration, null split, both
            directions of train ↔ synthetic, synthetic → validation — becomes the best ``refine`` score among the
            query's ``refine_k`` most correlated references, so τ is the null of the same score.
        refine_k: candidates per query handed to ``refine``.
        best_of: other features of the same images, one ``(train, val, synthetic)`` triple per feature set (e.g.
            pixels beside the embedding). Each set's correlations are first put on a common scale anchored at that
            set's own null, ``(r − τ_b) / (1 − τ_b)`` with τ_b calibrated on that set alone (so every τ_b maps to 0
            and an exact copy to 1); a pair's score is then the best of its sets' values, and every best match
            above — calibration included — is taken on that score, so τ is the null of the combination. With
            ``refine``, the first set's values are its ``refine`` scores (pass the same features again in
            ``best_of`` to keep their plain correlations as another set); a refine returning R scores per query
            (``[n, R]``) gives R such sets.
        null_views: with ``best_of``, one list per ``best_of`` set of other versions of its validation rows (e.g.
            the validation images at a lower resolution, the same rows in the same order) that calibrate that set's
            τ_b too: each training sample's best validation correlation in that set is its best over the validation
            rows and every view's. The null then holds new patients' images as a generator might degrade them, so
            a degraded new image does not clear τ_b by its lost detail alone. The null split's halves take the
            views of their own rows; the synthetic → validation column and ``null_rate_copies`` use the rows as
            they are.
        blend: indices of ``best_of`` sets whose pairs are scored as blends (:func:`blend_correlation`): every
            best match of that set, calibration and its views included, is the query's best fit by at most two
            references of its own set instead of one, so a sample that superimposes two training images scores as
            high as a copy of one.
        headroom: in [0, 1): flag against ``τ + headroom · (1 − τ)`` (:func:`with_headroom`) instead of τ, the
            percentile threshold: a copy must also clear that share of the way from τ to an exact copy. 0 (default)
            is the paper's rule. It keeps false alarms down when the validation patients are few or less alike to
            the training patients than new patients may be (docs/benchmarks/detection_candidates.md section 10);
            ``threshold``, the null split's threshold and the bootstrap use it, ``percentile_threshold`` keeps τ,
            and ``null_rate_expected`` ((100 − p)%) becomes an upper bound.

    Returns:
        :class:`MatchResult`. ``summary`` keys: threshold, percentile, percentile_threshold, headroom, n_train,
        n_val, n_synthetic, n_memorized_train, frac_memorized_train, n_copies_synthetic, frac_copies_synthetic,
        threshold_ci95, frac_memorized_train_ci95, frac_copies_synthetic_ci95, n_bootstrap, null_rate,
        null_rate_copies, null_rate_expected, null_threshold, seed, subject_exclusion, device, dtype,
        memscan_version, and with ``best_of`` ``feature_set_thresholds`` (each set's own τ_b, the first being
        ``train_emb``'s, or the refine's R sets).

    Raises:
        InputError: invalid embeddings, mismatched dimensions, bad arguments.
    """
    p = _check_percentile(percentile)
    headroom = _check_headroom(headroom)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise InputError("n_bootstrap", f"must be a non-negative integer, got {n_bootstrap!r}")
    dev, dt = resolve_device(device), _resolve_dtype(dtype)
    train = validate_embeddings(train_emb, "train")
    val = validate_embeddings(val_emb, "val")
    syn = validate_embeddings(synthetic_emb, "synthetic")
    _check_dims([("train", train), ("val", val), ("synthetic", syn)])
    n_t, n_v, n_s = len(train), len(val), len(syn)
    t_codes, v_codes = _group_codes(train_subjects, val_subjects, n_t, n_v, ("train_subjects", "val_subjects"))
    if val_subjects is not None and len(np.asarray(val_subjects, dtype=object).ravel()) != n_v:
        raise InputError("val_subjects", f"has {len(np.asarray(val_subjects, dtype=object).ravel())} subject ids "
                                         f"for {n_v} embeddings")
    t_labels = _labels(train_ids, n_t, "train_ids")
    s_labels = _labels(synthetic_ids, n_s, "synthetic_ids")
    rng = np.random.default_rng(seed)

    search = dict(device=dev, dtype=dt, block_size=block_size)
    if refine is not None and (isinstance(refine_k, bool) or not isinstance(refine_k, (int, np.integer))
                               or refine_k < 1):
        raise InputError("refine_k", f"must be a positive integer, got {refine_k!r}")
    sets = {"train": train, "val": val, "synthetic": syn}
    blocks = [(train, val, syn)]
    if best_of:
        for b, triple in enumerate(best_of, start=1):
            if len(triple) != 3:
                raise InputError(f"best_of[{b - 1}]", "must be a (train, val, synthetic) triple")
            arrays = [validate_embeddings(x, f"best_of[{b - 1}] {what}") for x, what in zip(triple, sets)]
            for arr, what, n in zip(arrays, sets, (n_t, n_v, n_s)):
                if len(arr) != n:
                    raise InputError(f"best_of[{b - 1}] {what}", f"has {len(arr)} rows for {n} images")
            _check_dims([(f"best_of[{b - 1}] {what}", arr) for arr, what in zip(arrays, sets)])
            blocks.append(tuple(arrays))
    views: list[list[np.ndarray]] = [[] for _ in blocks]  # per feature set: its validation rows' other versions
    if null_views is not None:
        if not best_of or len(null_views) != len(best_of):
            raise InputError("null_views", f"needs one list per best_of set ({len(best_of or [])}), "
                                           f"got {len(null_views)}")
        for b, found in enumerate(null_views, start=1):
            for k, view in enumerate(found):
                name = f"null_views[{b - 1}][{k}]"
                arr = validate_embeddings(view, name)
                if len(arr) != n_v:
                    raise InputError(name, f"has {len(arr)} rows for {n_v} validation images")
                _check_dims([(f"best_of[{b - 1}] val", blocks[b][1]), (name, arr)])
                views[b].append(arr)
    blended = set()  # block indices (the first block is the matched features) scored as blends
    for b in np.asarray(blend, dtype=object).ravel() if blend is not None else ():
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b < len(best_of or []):
            raise InputError("blend", f"expected indices of best_of sets (0 to {len(best_of or []) - 1}), got {b!r}")
        blended.add(int(b) + 1)

    def refined(query: str, reference: str, rows: np.ndarray | None = None, ref_rows: np.ndarray | None = None,
                q_codes: np.ndarray | None = None, r_codes: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``refine`` scores (and reference indices) of each query row among its top feature correlations,
        ``[rows, R]`` (one column per way the refine scores a pair)."""
        q_all, r_all = sets[query], sets[reference]
        rows = np.arange(len(q_all)) if rows is None else rows
        ref_rows = np.arange(len(r_all)) if ref_rows is None else ref_rows
        v, i, _, _ = _exact_search(q_all[rows], r_all[ref_rows], int(min(refine_k, len(ref_rows))), q_codes=q_codes,
                                   r_codes=r_codes, **search)
        candidates = np.where(i >= 0, ref_rows[np.maximum(i, 0)], -1)
        score, index = refine(query, rows, reference, candidates, v)
        score, index = np.asarray(score, dtype=np.float64), np.asarray(index, dtype=np.int64)
        if score.ndim == 1 and index.ndim == 1:  # one score per query: one column
            score, index = score[:, None], index[:, None]
        if score.ndim != 2 or len(score) != len(rows) or index.shape != score.shape or \
                (n_refined and score.shape[1] != n_refined):
            raise InputError("refine", f"must return two arrays of {len(rows)} values (or {len(rows)} rows of "
                                       f"{n_refined or 'R'} values), got {score.shape} and {index.shape}")
        return score, index

    # train → validation, as two halves A/B: the full best (for τ) and the null rate for one pass's work
    halves = _split_halves(n_v, val_subjects, rng)
    parts = [np.arange(n_v)] if halves is None else list(halves)
    # per feature set: (best per training row, best per validation row of half B) per part, and the best per
    # training row over the whole validation set (the best over the halves, but for a blend of rows from both)
    block_parts = []
    n_refined = 0  # score sets the refine gives (its columns); they replace the first feature set
    first_plain = 1 if refine is not None else 0
    if refine is not None:  # refine re-scores the first feature set's candidates
        found_best, found_cols = [], []
        for k_part, rows in enumerate(parts):
            r_codes = None if v_codes is None else v_codes[rows]
            found_best.append(refined("train", "val", ref_rows=rows, q_codes=t_codes, r_codes=r_codes)[0])
            n_refined = found_best[-1].shape[1]
            found_cols.append(None if halves is None or k_part == 0 else
                              refined("val", "train", rows=rows, q_codes=r_codes, r_codes=t_codes)[0])
        block_parts.extend(([fb[:, j] for fb in found_best], [None if fc is None else fc[:, j] for fc in found_cols],
                            np.max([fb[:, j] for fb in found_best], axis=0)) for j in range(n_refined))

    def null_best(bi: int, rows: np.ndarray, column: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """A plain set's best validation value per training row over ``rows`` of the validation set and, with
        ``column``, the best training value per validation row; every null view counts for the first."""
        (b_train, b_val, _), r_codes = blocks[bi], None if v_codes is None else v_codes[rows]
        if bi in blended:  # blends are searched from each side in turn (no columns from shared tiles)
            v = _blend_search(b_train, b_val[rows], q_codes=t_codes, r_codes=r_codes, **search)[0]
            cv = _blend_search(b_val[rows], b_train, q_codes=r_codes, r_codes=t_codes,
                               **search)[0] if column else None
        else:
            v, _, cv, _ = _exact_search(b_train, b_val[rows], 1, q_codes=t_codes, r_codes=r_codes, columns=column,
                                        indices=False, **search)
            v = v[:, 0]
        for view in views[bi]:  # the same rows in another version: the null takes the best of all
            v = np.maximum(v, _blend_search(b_train, view[rows], q_codes=t_codes, r_codes=r_codes, **search)[0]
                           if bi in blended else
                           _exact_search(b_train, view[rows], 1, q_codes=t_codes, r_codes=r_codes, indices=False,
                                         **search)[0][:, 0])
        return v, cv

    for bi in range(first_plain, len(blocks)):
        found_parts = [null_best(bi, rows, halves is not None and k_part == 1) for k_part, rows in enumerate(parts)]
        part_best = [v for v, _ in found_parts]
        full = null_best(bi, np.arange(n_v), False)[0] if bi in blended and halves is not None else \
            np.max(part_best, axis=0)
        block_parts.append((part_best, [cv for _, cv in found_parts], full))
    block_taus: list[float] = []
    part_best, part_cols, best_val_t = block_parts[0]
    if len(block_parts) > 1:  # each set's own τ_b, then every part's values on the common scale, best set per row
        for _, _, full in block_parts:
            _no_valid_row(full, "train_subjects", "this training sample shares its subject with every validation "
                                                  "sample: no other-patient correlation to calibrate on")
            block_taus.append(_percentile_1d(full, p))
        part_best = [_best_of_sets([scale_to_null(bp[0][k], t) for bp, t in zip(block_parts, block_taus)])[0]
                     for k in range(len(parts))]
        part_cols = [None if block_parts[0][1][k] is None else
                     _best_of_sets([scale_to_null(bp[1][k], t) for bp, t in zip(block_parts, block_taus)])[0]
                     for k in range(len(parts))]
        best_val_t = _best_of_sets([scale_to_null(bp[2], t) for bp, t in zip(block_parts, block_taus)])[0]
    _no_valid_row(best_val_t, "train_subjects", "this training sample shares its subject with every validation "
                                                "sample: no other-patient correlation to calibrate on")
    tau_p = _percentile_1d(best_val_t, p)
    tau = with_headroom(tau_p, headroom)

    null_rate = null_rate_copies = null_tau = math.nan
    if halves is not None and not np.isneginf(part_best[0]).any():  # else a training subject fills half A
        null_tau = with_headroom(_percentile_1d(part_best[0], p), headroom)
        null_rate = float(np.mean(part_best[1] > null_tau))
        null_rate_copies = float(np.mean(part_cols[1] > null_tau))

    # per score set: (train → synthetic best, index, synthetic → train best, index, synthetic → val best, and for a
    # blend set each synthetic image's second training source, else None)
    found = []
    if refine is not None:
        t_v, t_i = refined("train", "synthetic")
        s_v, s_i = refined("synthetic", "train")
        v_v = refined("synthetic", "val")[0]
        found.extend((t_v[:, j], t_i[:, j], s_v[:, j], s_i[:, j], v_v[:, j], None) for j in range(n_refined))
    for bi in range(first_plain, len(blocks)):
        b_train, b_val, b_syn = blocks[bi]
        if bi in blended:
            t_v, t_i, _ = _blend_search(b_train, b_syn, q_codes=None, r_codes=None, **search)
            s_v, s_i, s_j = _blend_search(b_syn, b_train, q_codes=None, r_codes=None, **search)
            v_v = _blend_search(b_syn, b_val, q_codes=None, r_codes=None, **search)[0]
        else:
            s_j = None
            # train ↔ synthetic: row and column maxima from the same tiles
            t_v, t_i, s_v, s_i = best_matches(b_train, b_syn, **search)
            # synthetic → validation (for the table's best validation correlation)
            v_v = _exact_search(b_syn, b_val, 1, q_codes=None, r_codes=None, indices=False, **search)[0][:, 0]
        found.append((t_v, t_i, s_v, s_i, v_v, s_j))
    if block_taus:
        found = [(scale_to_null(t_v, tau_b), t_i, scale_to_null(s_v, tau_b), s_i, scale_to_null(v_v, tau_b), s_j)
                 for (t_v, t_i, s_v, s_i, v_v, s_j), tau_b in zip(found, block_taus)]
    best_syn_t, best_syn_t_idx = _best_of_located([f[0] for f in found], [f[1] for f in found])
    # the second source of a blend, where a blend set gives a synthetic image its best score (-1 elsewhere)
    best_train_s, best_train_s_idx, second_train_s = _best_of_located(
        [f[2] for f in found], [f[3] for f in found],
        [np.full(n_s, -1, dtype=np.int64) if f[5] is None else f[5] for f in found])
    if not blended:
        second_train_s = None
    best_val_s = _best_of_sets([f[4] for f in found])[0]

    memorized = best_syn_t > tau
    copies = best_train_s > tau
    n_mem, n_copies = int(memorized.sum()), int(copies.sum())

    draws = _bootstrap(best_val_t, best_syn_t, best_train_s, p, int(n_bootstrap), rng, headroom) if n_bootstrap else {}
    summary: dict[str, Any] = {
        "threshold": tau,
        "percentile": p,
        "percentile_threshold": tau_p,
        "headroom": headroom,
        "n_train": n_t,
        "n_val": n_v,
        "n_synthetic": n_s,
        "n_memorized_train": n_mem,
        "frac_memorized_train": n_mem / n_t,
        "n_copies_synthetic": n_copies,
        "frac_copies_synthetic": n_copies / n_s,
        "threshold_ci95": _interval(draws["threshold"]) if draws else None,
        "frac_memorized_train_ci95": _interval(draws["frac_memorized_train"]) if draws else None,
        "frac_copies_synthetic_ci95": _interval(draws["frac_copies_synthetic"]) if draws else None,
        "n_bootstrap": int(n_bootstrap),
        "null_rate": null_rate,
        "null_rate_copies": null_rate_copies,
        "null_rate_expected": (100.0 - p) / 100.0,
        "null_threshold": null_tau,
        "null_split_sizes": None if halves is None else [int(len(halves[0])), int(len(halves[1]))],
        "seed": int(seed),
        "subject_exclusion": t_codes is not None,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "refined": refine is not None,
        **({"feature_set_thresholds": block_taus} if block_taus else {}),
        **({"blended_sets": sorted(b - 1 for b in blended)} if blended else {}),
        "memscan_version": __version__,
    }

    train_cols: dict[str, Any] = {"train_index": np.arange(n_t)}
    if t_labels is not None:
        train_cols["train_id"] = t_labels
    train_cols["best_synthetic_index"] = best_syn_t_idx
    if s_labels is not None:
        train_cols["best_synthetic_id"] = s_labels[best_syn_t_idx]
    train_cols.update(correlation=best_syn_t, memorized=memorized)
    syn_cols: dict[str, Any] = {"synthetic_index": np.arange(n_s)}
    if s_labels is not None:
        syn_cols["synthetic_id"] = s_labels
    syn_cols["best_train_index"] = best_train_s_idx
    if t_labels is not None:
        syn_cols["best_train_id"] = t_labels[best_train_s_idx]
    if second_train_s is not None:  # with blend sets: the blended sample's other training source
        syn_cols["second_train_index"] = second_train_s
        if t_labels is not None:
            syn_cols["second_train_id"] = np.where(second_train_s >= 0, t_labels[np.maximum(second_train_s, 0)], None)
    syn_cols.update(correlation=best_train_s, best_validation_correlation=best_val_s, margin=best_train_s - tau,
                    copy=copies)
    train_table, synthetic_table = pd.DataFrame(train_cols), pd.DataFrame(syn_cols)
    return MatchResult(summary=summary, train_table=train_table, synthetic_table=synthetic_table, threshold=tau,
                       best_val_for_train=best_val_t, best_synthetic_for_train=best_syn_t,
                       best_train_for_synthetic=best_train_s, best_val_for_synthetic=best_val_s,
                       bootstrap=draws)

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memscan.io import (
    atomic_path,
    copy_file_atomic,
    json_safe,
    save_npy_atomic,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "summary.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_files_get_umask_permissions_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_csv_atomic(pd.DataFrame({"a": [1]}), tmp_path / "sub" / "t.csv")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text().splitlines() == ["a", "1"]


def test_json_is_strict_and_numpy_aware(tmp_path):
    data = {"n": np.int64(3), "x": np.float32(0.5), "bad": float("nan"), "flag": np.bool_(True),
            "arr": np.arange(2), "p": Path("a/b"), "t": (1, 2)}
    path = write_json_atomic(tmp_path / "s.json", data)
    assert json.loads(path.read_text()) == {"n": 3, "x": 0.5, "bad": None, "flag": True, "arr": [0, 1],
                                            "p": "a/b", "t": [1, 2]}
    assert json_safe({1: float("inf")}) == {"1": None}


def test_npy_and_copy_round_trip(tmp_path):
    arr = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.load(save_npy_atomic(tmp_path / "e.npy", arr)), arr)
    src = write_text_atomic(tmp_path / "a.txt", "x")
    assert copy_file_atomic(src, tmp_path / "out" / "a.txt").read_text() == "x"

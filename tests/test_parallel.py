"""Tests of memscan.parallel: task order, errors, and the intra-op thread count."""

from __future__ import annotations

import threading

import pytest
import torch

from memscan.parallel import intra_op_threads, run_concurrently


def test_intra_op_threads_restores_the_count_even_on_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with intra_op_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_run_concurrently_keeps_order_and_uses_threads() -> None:
    names: list[str] = []
    lock = threading.Lock()

    def task(i: int):
        def run() -> int:
            with lock:
                names.append(threading.current_thread().name)
            return i * i
        return run

    before = torch.get_num_threads()
    assert run_concurrently([task(i) for i in range(5)], workers=2) == [0, 1, 4, 9, 16]
    assert all(name.startswith("memscan") for name in names)
    assert torch.get_num_threads() == before
    names.clear()
    assert run_concurrently([task(3)], workers=4) == [9]  # one task: on the caller's thread
    assert names == [threading.current_thread().name]


def test_run_concurrently_tasks_see_one_intra_op_thread_and_errors_propagate() -> None:
    seen = run_concurrently([torch.get_num_threads, torch.get_num_threads], workers=2)
    assert seen == [1, 1]

    def fail() -> None:
        raise ValueError("bad task")

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="bad task"):
        run_concurrently([lambda: 1, fail], workers=2)
    assert torch.get_num_threads() == before


_FAULT_PROBE = """
import resource, sys, torch
from memscan.parallel import reuse_freed_memory

def faults(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        big = torch.ones(1 << 24)  # 64 MB: above glibc's largest dynamic mmap threshold (32 MB)
        small = torch.ones(1 << 22)
        del big, small
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = faults(4)
with reuse_freed_memory():
    with reuse_freed_memory():  # nested: the outer block keeps the setting
        faults(6)  # the heap grows once to hold them
    inside = faults(4)
after = faults(4)
print(outside, inside, after)
"""


def test_reuse_freed_memory_stops_page_faulting_large_tensors_and_restores_on_exit() -> None:
    import subprocess
    import sys

    from memscan.parallel import _glibc

    if _glibc() is None:
        pytest.skip("not glibc: reuse_freed_memory is a no-op here")
    # a fresh interpreter: how glibc serves a large block depends on the heap's history (what earlier tests left)
    run = subprocess.run([sys.executable, "-c", _FAULT_PROBE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    outside, inside, after = (int(v) for v in run.stdout.split())
    assert outside > 4 * 8000  # each fresh 64 MB mapping faults in ~16k pages
    assert inside < outside / 4
    assert after > 4 * 8000  # thresholds back: 64 MB blocks are mapped (and returned) again

"""Thread-level parallelism for small CPU ops: one intra-op thread per task, tasks side by side.

torch splits every op over all cores; for ops of a millisecond or less the threads mostly wait on each other (far
worse when other processes share the cores). Running independent tasks on Python threads, each with one intra-op
thread, keeps every core busy without a barrier per op (torch and numpy release the GIL inside their kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["intra_op_threads", "run_concurrently"]

T = TypeVar("T")


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count.

    The count is per thread once a thread has used it, but ``torch.set_num_threads`` also sets the process-wide
    default that a thread reads on its first parallel op: a thread that may start torch work while another one is
    inside this block should call ``torch.get_num_threads()`` first (``embed_images`` does before its loader thread
    starts).

    Args:
        n: threads for the block (>= 1).
    """
    previous = torch.get_num_threads()
    if n == previous:
        yield
        return
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_concurrently(tasks: Sequence[Callable[[], T]], workers: int | None = None) -> list[T]:
    """Run ``tasks`` on up to ``workers`` threads (default: torch's intra-op thread count), one intra-op thread
    each, and return their results in order; with one worker or one task they run in turn on the caller's thread.

    Args:
        tasks: callables without arguments.
        workers: thread count; None for ``torch.get_num_threads()``.

    Returns:
        The tasks' results, in the order of ``tasks``. The first exception raised by a task propagates.
    """
    workers = min(len(tasks), torch.get_num_threads() if workers is None else int(workers))
    if workers <= 1:
        return [task() for task in tasks]
    with intra_op_threads(1), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memscan") as pool:
        futures = [pool.submit(task) for task in tasks]
        return [f.result() for f in futures]

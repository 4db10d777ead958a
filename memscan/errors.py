"""User-facing errors: one clear line naming the file and the reason, never a traceback."""

from __future__ import annotations

from pathlib import Path

__all__ = ["MemscanError", "InputError", "EXIT_OK", "EXIT_BAD_INPUT", "EXIT_GATE"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_GATE = 3


class MemscanError(Exception):
    """An error caused by the user's input or settings.

    The CLI prints ``str(error)`` on one line to stderr and exits with ``exit_code``; the Python API raises it.
    """

    exit_code: int = EXIT_BAD_INPUT


class InputError(MemscanError, ValueError):
    """A bad input file or value.

    Args:
        source: the file (or named input) at fault.
        reason: what is wrong, in words a user can act on.
        row: optional row / sample index inside the file.
    """

    def __init__(self, source: str | Path | None, reason: str, row: int | None = None) -> None:
        self.source = None if source is None else str(source)
        self.reason = reason
        self.row = row
        where = "" if self.source is None else f"{self.source}"
        if row is not None:
            where = f"{where} (row {row})" if where else f"row {row}"
        super().__init__(f"{where}: {reason}" if where else reason)

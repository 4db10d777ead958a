"""The ``memscan`` command line: one subcommand module per job, all calling the library.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 3 release gate failed
(``audit --fail-above``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from memscan import __version__
from memscan.errors import EXIT_BAD_INPUT, MemscanError

__all__ = ["main", "build_parser", "COMMANDS"]

# Each module in memscan/cli/ exposes ``add_parser(subparsers)`` and ``run(args) -> int``.
COMMANDS: tuple[str, ...] = ("match", "check", "split", "train", "embed", "audit", "demo")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="memscan",
        description="Find patient-data copies in synthetic medical images (Dar et al. memorization audit).",
    )
    parser.add_argument("--version", action="version", version=f"memscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"memscan.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memscan`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="memscan: %(message)s", stream=sys.stderr
    )
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.run(args) or 0)
    except MemscanError as err:
        print(f"memscan {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"memscan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

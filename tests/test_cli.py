from __future__ import annotations

import subprocess
import sys

import pytest

from memscan import __version__
from memscan.cli import COMMANDS, build_parser, main
from memscan.errors import InputError


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: memscan" in capsys.readouterr().out


def test_every_listed_command_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


def test_user_error_is_one_line_without_traceback(monkeypatch, capsys):
    parser = build_parser()

    def failing_run(args):
        raise InputError("scan.png", "file is empty (0 bytes)")

    monkeypatch.setattr("memscan.cli.build_parser", lambda: parser)
    sub = next(a for a in parser._actions if a.dest == "command")
    name = next(iter(sub.choices))
    sub.choices[name].set_defaults(run=failing_run)
    required = [a for a in sub.choices[name]._actions if a.required]
    argv = [name]
    for action in required:
        argv += [action.option_strings[0], "x"] if action.option_strings else ["x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"memscan {name}: error: scan.png: file is empty (0 bytes)"
    assert "Traceback" not in err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "memscan", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout

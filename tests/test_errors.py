from __future__ import annotations

from memscan.errors import EXIT_BAD_INPUT, InputError, MemscanError


def test_input_error_names_file_and_row():
    err = InputError("/data/train.npy", "row is constant (zero variance)", row=7)
    assert str(err) == "/data/train.npy (row 7): row is constant (zero variance)"
    assert err.exit_code == EXIT_BAD_INPUT
    assert isinstance(err, MemscanError) and isinstance(err, ValueError)


def test_input_error_without_source_or_row():
    assert str(InputError(None, "no images")) == "no images"
    assert str(InputError("a.png", "unreadable")) == "a.png: unreadable"
    assert str(InputError(None, "bad", row=2)) == "row 2: bad"

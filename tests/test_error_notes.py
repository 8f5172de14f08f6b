"""add_note: what deqhess adds to an exception it passes through reaches the user on every
Python deqhess supports (3.10 has no ``BaseException.add_note``)."""

from __future__ import annotations

import sys
import traceback

import pytest

from deqhess.errors import add_note


def test_the_note_is_printed_under_the_message():
    error = ValueError("the cell failed")
    add_note(error, "deqhess: h0 may be the cause")
    printed = "".join(traceback.format_exception(error))
    assert "the cell failed" in printed and "deqhess: h0 may be the cause" in printed
    assert error.__notes__ == ["deqhess: h0 may be the cause"]


def test_without_notes_the_note_joins_the_message(monkeypatch: pytest.MonkeyPatch):
    """Python 3.10: the note becomes part of ``str(error)``; other arguments are kept."""
    monkeypatch.setattr(sys, "version_info", (3, 10, 14))
    error = KeyError("missing", 3)
    add_note(error, "first note")
    add_note(error, "second note")
    assert error.args == ("missing\nfirst note\nsecond note", 3)
    assert error.__notes__ == ["first note", "second note"]
    odd = RuntimeError(7)  # no string message to join: the note is kept in __notes__
    add_note(odd, "a note")
    assert odd.args == (7,) and odd.__notes__ == ["a note"]

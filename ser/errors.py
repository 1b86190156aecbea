"""Errors raised for bad user input, so entry points can print them without a traceback."""

from __future__ import annotations


class SerInputError(ValueError):
    """A file, field or parameter given by the user is wrong; the message says which and how."""


class TrainingDiverged(SerInputError):
    """Training's loss or weights stopped being finite: the run is stopped, never marked
    complete, and the message says what to change (its causes are settings or data)."""

"""Errors raised for bad user input, so entry points can print them without a traceback."""

from __future__ import annotations


class SerInputError(ValueError):
    """A file, field or parameter given by the user is wrong; the message says which and how."""

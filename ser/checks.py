"""Checks of configuration values, raising one error that names the parameter and what it takes.

Every config's ``check()`` (``ser.config``) is made of these. A :class:`ConfigError` knows which
parameter it is about, so a method that sets a stage's ``lr`` from its own ``phase2_lr`` can
report the parameter the user actually typed (:meth:`ConfigError.renamed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ser.errors import SerInputError


class _Names(dict):  # type: ignore[type-arg]
    """Formats ``{field}`` in a requirement as the name the user knows that field by."""

    def __missing__(self, key: str) -> str:
        return key


class ConfigError(SerInputError):
    """``param=value`` and what the parameter takes; ``{other}`` in ``requirement`` names
    another parameter, and is renamed with it."""

    def __init__(
        self, param: str, value: Any, requirement: str, names: Mapping[str, str] | None = None
    ) -> None:
        self.param, self.value, self.requirement = param, value, requirement
        self.names = _Names(names or {})
        super().__init__(
            f"{self.names[param]}={value!r} {requirement.format_map(self.names)}"
        )

    def renamed(self, names: Mapping[str, str]) -> ConfigError:
        """The same error, naming parameters as ``names`` maps them (stage field -> method
        parameter)."""
        return ConfigError(self.param, self.value, self.requirement, {**self.names, **names})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def finite(config: Any, name: str) -> float:
    value = getattr(config, name)
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(name, value, "must be a finite number")
    return float(value)


def positive(config: Any, *names: str) -> None:
    """Finite and > 0 (NaN fails too: it is not > 0)."""
    for name in names:
        value = getattr(config, name)
        if not _is_number(value) or not math.isfinite(value) or not value > 0:
            raise ConfigError(name, value, "must be a finite number > 0")


def integer(config: Any, name: str, low: int, high: int | None = None) -> None:
    value = getattr(config, name)
    bad = isinstance(value, bool) or not isinstance(value, int) or value < low
    if bad or (high is not None and value > high):
        span = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(name, value, f"must be an integer {span}")


def in_range(
    config: Any, name: str, low: float, high: float, *, low_open: bool = False,
    high_open: bool = False, why: str = "",
) -> None:
    """``low <= value <= high`` (``<`` where open); NaN and infinities fail."""
    value = getattr(config, name)
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(name, value, f"must be in {interval}{why}")


def one_of(config: Any, name: str, choices: Iterable[str]) -> None:
    allowed = tuple(choices)
    value = getattr(config, name)
    if value not in allowed:
        raise ConfigError(name, value, f"is not one of: {', '.join(allowed)}")


def not_empty(config: Any, name: str, what: str) -> None:
    if not getattr(config, name):
        raise ConfigError(name, getattr(config, name), f"is empty; pass {what}")

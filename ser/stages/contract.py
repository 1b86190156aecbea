"""The stage contract: what a stage declares, and what its caller hands it when it runs.

Each stage module ends with one :class:`Stage` declaration; the pipelines (``ser.pipelines``)
and the entry points use nothing else of it. A stage:

- reads its parameters from one config dataclass (``ser.config``), whose ``check()`` refuses bad
  values before anything runs;
- names the config fields that are inputs (paths, or ``runs:/`` URIs that the pipelines
  download first) and the per-fold output folders it writes (``ser.artifacts``);
- runs as ``run(config, context)`` and returns a result whose ``output_dir`` holds its outputs.

Stages never import each other: what they share is in ``ser.training`` (loops, folds, loaders,
callbacks) and ``ser.models`` (loading and saving models).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import Logger

# A Lightning logger for one fold (or one fine-tuning run, "<fold>/run_<r>"), or False for none.
LoggerFactory = Callable[[str], Logger | bool]
# Extra callbacks for one Trainer, given its index (folds x repeats, in order) and name; e.g. a
# search's pruning callback, which counts its steps across runs.
CallbackFactory = Callable[[int, str], Sequence[Callback]]


@dataclass(frozen=True)
class StageContext:
    """What the caller gives a running stage besides its config. None of it changes results, so
    none of it is part of a reuse key."""

    logger_factory: LoggerFactory | None = None
    callback_factory: CallbackFactory | None = None

    def logger(self, name: str) -> Logger | bool:
        return self.logger_factory(name) if self.logger_factory else False

    def callbacks(self, index: int, name: str) -> list[Callback]:
        return list(self.callback_factory(index, name)) if self.callback_factory else []


class StageResult(Protocol):
    """What every stage returns: where its outputs are."""

    output_dir: Path


@dataclass(frozen=True)
class Stage:
    """A stage's declaration."""

    name: str  # the MLproject entry point and the ser.stage tag
    config_cls: type[Any]
    run: Callable[[Any, StageContext], StageResult]
    inputs: tuple[str, ...] = ()  # config fields that may be artifact URIs
    outputs: tuple[str, ...] = ()  # per-fold output folders, logged as <output>/<fold>/...
    top_level: tuple[str, ...] = ()  # folders of output_dir that are not folds

    def check(self, config: Any) -> None:
        """Refuse bad values of ``config`` (its ``check()``) before any work starts."""
        if not isinstance(config, self.config_cls):
            raise TypeError(f"stage {self.name} takes a {self.config_cls.__name__}")
        config.check()


NO_CONTEXT = StageContext()  # a stage run on its own: no logger, no extra callbacks

"""What every stage does before training: find its folds, check inputs, lay out its outputs.

Output layout of a stage run (``output_dir`` defaults to ``outputs/<stage>``)::

    output_dir/
      config.json              the resolved config of the run
      <fold>/                  one folder per fold file (its name without .json)
        checkpoints/           Lightning checkpoints: best save_top_k and last.ckpt
        ...                    the stage's outputs for that fold (backbone/, w2v1/, clusters/, ...)

An input that an earlier stage produced per fold (``pretrained_path``, ``clusterpath``) may be
given as that stage's ``output_dir``-like folder: :func:`fold_input` then picks the fold's own
subfolder, so fold *i* of fine-tuning uses the backbone pretrained on fold *i*'s Train split.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ser.atomic import atomic_write_json
from ser.audio import check_audio_files
from ser.data.labels import LabelFile, read_label_dir, read_label_file
from ser.errors import SerInputError

log = logging.getLogger(__name__)


def load_folds(config: Any, classes: Iterable[str] | None = None) -> list[LabelFile]:
    """The fold files of ``config.labelpath`` (one) or ``config.labeldir`` (all), validated.

    Every audio file that any fold names is checked here (header only), so a bad file stops the
    run before any training starts.
    """
    audio_dir = Path(config.datadir)
    if not audio_dir.is_dir():
        raise SerInputError(
            f"datadir {audio_dir} is not a directory; pass the folder the label files' audio "
            "paths are relative to (e.g. data/demo/Audio_16k)"
        )
    wanted = list(classes) if classes else None
    if config.labelpath:
        folds = [read_label_file(config.labelpath, audio_dir, wanted)]
    else:
        folds = read_label_dir(config.labeldir, audio_dir, wanted)
    names = sorted({name for fold in folds for name in fold.files()})
    check_audio_files([audio_dir / name for name in names], downmix=config.downmix)
    return folds


def resolve_classes(config: Any, folds: list[LabelFile]) -> list[str]:
    """``config.classes`` (comma-separated) or the sorted labels of every fold."""
    if getattr(config, "classes", ""):
        classes = [c.strip() for c in config.classes.split(",") if c.strip()]
        if len(set(classes)) < 2:
            raise SerInputError(f"classes={config.classes!r}: give at least two distinct classes")
        for fold in folds:  # validates labels against the declared set
            read_label_file(fold.path, classes=classes)
        return classes
    classes = sorted({label for fold in folds for label in fold.classes()})
    if len(classes) < 2:
        raise SerInputError(f"the label files hold only the class(es) {classes}; need two or more")
    return classes


def fold_input(path: str, fold: LabelFile) -> str:
    """``path/<fold>`` when an earlier stage wrote one folder per fold there, else ``path``."""
    candidate = Path(path) / fold.name
    return str(candidate) if path and candidate.is_dir() else path


def save_config(config: Any, output_dir: Path, **extra: Any) -> Path:
    """Write the resolved config beside the outputs, so a run explains itself."""
    target = output_dir / "config.json"
    atomic_write_json(target, {**dataclasses.asdict(config), **extra})
    return target


def seed_everything(seed: int) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)


def positive(name: str, value: float) -> None:
    """Refuse a non-positive numeric parameter before any work starts."""
    if value <= 0:
        raise SerInputError(f"{name}={value} must be positive")

"""The label-file format: one JSON object per fold with ``Train``, ``Val`` and ``Test`` splits.

Each split maps an audio file name, relative to the audio directory, to an emotion label::

    {"Train": {"Ses01F_impro01_F000.wav": "neutral", ...}, "Val": {}, "Test": {...}}

An empty split is skipped (IEMOCAP's session files have an empty ``Val``). A label directory holds
one such file per fold. Everything here validates before any long work starts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ser.atomic import atomic_write_json
from ser.errors import SerInputError

SPLITS = ("Train", "Val", "Test")
_SHOW = 5  # how many offending entries an error message lists


@dataclass
class LabelFile:
    """One fold: the file it came from and its three splits (file name -> label)."""

    path: Path
    splits: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def train(self) -> dict[str, str]:
        return self.splits.get("Train", {})

    @property
    def val(self) -> dict[str, str]:
        return self.splits.get("Val", {})

    @property
    def test(self) -> dict[str, str]:
        return self.splits.get("Test", {})

    def classes(self) -> list[str]:
        """The sorted set of labels in the file, as the original derives its classes."""
        return sorted({label for split in self.splits.values() for label in split.values()})

    def files(self) -> list[str]:
        return [name for split in self.splits.values() for name in split]


def read_label_file(
    path: str | os.PathLike[str],
    audio_dir: str | os.PathLike[str] | None = None,
    classes: Iterable[str] | None = None,
) -> LabelFile:
    """Read and validate one label file.

    With ``audio_dir``, every listed audio file must exist there; with ``classes``, every label
    must be one of them. Raises :class:`SerInputError` naming the file and the entries at fault.
    """
    file = Path(path)
    raw = _load_json(file)
    splits = _parse_splits(file, raw)
    _check_paths(file, splits)
    _check_disjoint(file, splits)
    if classes is not None:
        _check_classes(file, splits, list(classes))
    if audio_dir is not None:
        _check_audio_exists(file, splits, Path(audio_dir))
    return LabelFile(path=file, splits=splits)


def read_label_dir(
    directory: str | os.PathLike[str],
    audio_dir: str | os.PathLike[str] | None = None,
    classes: Iterable[str] | None = None,
) -> list[LabelFile]:
    """Read every ``*.json`` fold file of a label directory, in sorted (natural) name order."""
    folder = Path(directory)
    if not folder.is_dir():
        raise SerInputError(
            f"label directory {folder} does not exist; pass a folder of fold files "
            "(one JSON per fold, as written by ser-demo-corpus or ser-prepare-iemocap)"
        )
    files = sorted(folder.glob("*.json"), key=_natural_key)
    if not files:
        raise SerInputError(f"label directory {folder} holds no *.json label files")
    wanted = list(classes) if classes is not None else None
    return [read_label_file(f, audio_dir, wanted) for f in files]


def write_label_file(path: str | os.PathLike[str], splits: Mapping[str, Mapping[str, str]]) -> None:
    """Write a fold file atomically, with all three split keys present."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; expected {list(SPLITS)}")
    atomic_write_json(path, {name: dict(splits.get(name, {})) for name in SPLITS})


def _natural_key(path: Path) -> list[tuple[int, int | str]]:
    # label_2.json sorts before label_10.json, so fold order never follows the directory listing.
    parts = re.split(r"(\d+)", path.name)
    return [(0, int(part)) if part.isdigit() else (1, part) for part in parts]


def _load_json(file: Path) -> object:
    if not file.is_file():
        raise SerInputError(f"label file {file} does not exist")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SerInputError(
            f"label file {file} is not valid JSON (line {err.lineno}, column {err.colno}: "
            f"{err.msg}); expected an object with 'Train', 'Val' and 'Test' splits"
        ) from err
    except UnicodeDecodeError as err:
        raise SerInputError(f"label file {file} is not UTF-8 text: {err}") from err


def _parse_splits(file: Path, raw: object) -> dict[str, dict[str, str]]:
    if not isinstance(raw, dict):
        raise SerInputError(
            f"label file {file} holds a JSON {type(raw).__name__}; expected an object "
            '{"Train": {file: label}, "Val": {...}, "Test": {...}}'
        )
    unknown = sorted(set(raw) - set(SPLITS))
    if unknown:
        raise SerInputError(
            f"label file {file} has unknown keys {unknown}; the splits are named exactly "
            f"{list(SPLITS)} (capitalised)"
        )
    splits: dict[str, dict[str, str]] = {}
    for name in SPLITS:
        entries = raw.get(name) or {}
        if not isinstance(entries, dict):
            raise SerInputError(
                f"label file {file}: '{name}' is a {type(entries).__name__}; expected an object "
                "mapping audio file names to labels"
            )
        bad = [key for key, value in entries.items() if not isinstance(value, str) or not value]
        if bad:
            raise SerInputError(
                f"label file {file}: {len(bad)} entries of '{name}' have a label that is not a "
                f"non-empty string, e.g. {_preview(bad)}"
            )
        splits[name] = dict(entries)
    if not splits["Train"]:
        raise SerInputError(f"label file {file}: 'Train' is empty; every fold needs training data")
    return splits


def _check_paths(file: Path, splits: dict[str, dict[str, str]]) -> None:
    escaping = [name for split in splits.values() for name in split if _escapes(name)]
    if escaping:
        raise SerInputError(
            f"label file {file}: {len(escaping)} audio paths are absolute or leave the audio "
            f"directory, e.g. {_preview(escaping)}; give paths relative to the audio directory "
            "without '..'"
        )


def _escapes(name: str) -> bool:
    posix = PurePosixPath(name.replace("\\", "/"))
    return not name or posix.is_absolute() or Path(name).is_absolute() or ".." in posix.parts


def _check_disjoint(file: Path, splits: dict[str, dict[str, str]]) -> None:
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1 :]:
            shared = sorted(set(splits[first]) & set(splits[second]))
            if shared:
                raise SerInputError(
                    f"label file {file}: {len(shared)} files are in both '{first}' and "
                    f"'{second}', e.g. {_preview(shared)}; a file belongs to one split of a fold"
                )


def _check_classes(file: Path, splits: dict[str, dict[str, str]], classes: list[str]) -> None:
    allowed = set(classes)
    outside = [
        f"{name}={label}"
        for split in splits.values()
        for name, label in split.items()
        if label not in allowed
    ]
    if outside:
        raise SerInputError(
            f"label file {file}: {len(outside)} labels are not among the run's classes "
            f"{sorted(allowed)}, e.g. {_preview(outside)}; relabel them, remove them, or "
            "declare the classes"
        )


def _check_audio_exists(file: Path, splits: dict[str, dict[str, str]], audio_dir: Path) -> None:
    if not audio_dir.is_dir():
        raise SerInputError(f"audio directory {audio_dir} (for label file {file}) does not exist")
    names = [name for split in splits.values() for name in split]
    missing = [name for name in names if not (audio_dir / name).is_file()]
    if missing:
        raise SerInputError(
            f"label file {file}: {len(missing)} audio files are missing from {audio_dir}, "
            f"e.g. {_preview(missing)}; check --datadir or the file names"
        )


def _preview(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else "")

"""Lightning checkpoints written and chosen safely: a kill at any moment costs at most the
checkpoint being written, and never stops the next run from resuming.

Writing (:class:`CheckpointIO`): Lightning's own writer stages a checkpoint in ``TMPDIR`` and
then moves it into place; with ``TMPDIR`` on another filesystem (a tmpfs ``/tmp``) that move is
a copy, so a kill during it leaves a truncated ``.ckpt`` under its final name, and an orphan in
``TMPDIR``. Here a checkpoint is written to a hidden file beside its target and renamed onto it.

Choosing (:func:`resume_point`): a checkpoint that is damaged all the same (written by an older
version, or cut short by a machine crash) is set aside, never deleted, and the newest intact one
is resumed from instead.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

from ser import artifacts
from ser.atomic import atomic_write_stream

log = logging.getLogger(__name__)

# The name ser.atomic.atomic_path gives the file it writes before renaming it onto <name>.
PARTIAL_WRITES = ".*.ckpt.*.tmp"
DAMAGED_SUFFIX = ".damaged"
_STEP_IN_NAME = re.compile(r"step=(\d+)")


class CheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, with each file written beside its target, fsynced and
    renamed into place (``TMPDIR`` is never used). Loading and removal are Lightning's."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # a remote store (s3://...): Lightning's fsspec writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"storage_options={storage_options!r} was given for checkpoint {path}; ser's "
                "CheckpointIO writes local files and takes none: call save_checkpoint without it"
            )

        def write(handle: BinaryIO) -> None:
            # Straight into the file: Lightning's writer holds a second copy in memory first.
            torch.save(checkpoint, handle)

        atomic_write_stream(path, write)


def resume_point(checkpoint_dir: Path) -> Path | None:
    """The checkpoint in ``checkpoint_dir`` to resume from, or None (start from the beginning).

    ``last.ckpt`` when it is intact, else the intact ``*.ckpt`` with the highest global step.
    Damaged checkpoints met on the way are renamed ``<name>.damaged`` with a warning, and
    temporary files of interrupted writes are removed. Call it on one process only (rank 0).
    """
    if not checkpoint_dir.is_dir():
        return None
    remove_partial_writes(checkpoint_dir)
    damaged: list[tuple[Path, Path, str]] = []
    chosen = None
    for candidate in _candidates(checkpoint_dir):
        reason = damage(candidate)
        if reason is None:
            chosen = candidate
            break
        damaged.append((candidate, set_aside(candidate), reason))
    for original, aside, reason in damaged:
        _warn_damaged(original, aside, reason, chosen)
    return chosen


def remove_partial_writes(checkpoint_dir: Path) -> list[Path]:
    """Remove what a kill inside :class:`CheckpointIO`'s writes left (never a finished file)."""
    partial = sorted(checkpoint_dir.glob(PARTIAL_WRITES))
    for path in partial:
        path.unlink(missing_ok=True)
        log.info("removed %s, the remains of a checkpoint write that was interrupted", path)
    return partial


def damage(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when it is an intact torch checkpoint.

    torch.save writes a zip archive whose central directory comes last, so a truncated file has
    none; each member carries a CRC-32, so altered or unwritten (zeroed) bytes fail ``testzip``.
    That check reads the file once, sequentially, in constant memory, and unpickles nothing;
    ``torch.load`` would build every tensor of a 1.2 GB checkpoint in memory just to throw
    them away. The CRC pass is kept (not only the directory check) because the file is read
    again right after by the resume, from the page cache, so it costs little extra.
    """
    if path.stat().st_size == 0:
        return "it is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        return f"it is not a whole zip archive as torch.save writes ({err}): it was truncated"
    if corrupt is not None:
        return f"its member {corrupt} fails its CRC check; its bytes are not those written"
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return "it is a zip archive but holds no data.pkl, so it is not a torch checkpoint"
    return None


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.damaged`` (``.damaged.2``, ... when taken): kept, not lost."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{number}")
    path.rename(target)
    return target


def global_step(path: Path) -> int:
    """The global step ``path`` was written at, read cheaply; -1 when it cannot be read.

    ``mmap=True`` maps the tensors instead of reading them, so only the small pickle is read.
    A file that does not load falls back on the step in its name (``{epoch}-{step}``).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return int(checkpoint["global_step"])
    except Exception:  # damaged, or objects weights_only refuses: the name still tells
        match = _STEP_IN_NAME.search(path.name)
        return int(match.group(1)) if match else -1


def _candidates(checkpoint_dir: Path) -> Iterator[Path]:
    """``last.ckpt`` first (it follows every save), then the others, newest step first: lazily,
    so the others' steps are read only when ``last.ckpt`` is unusable."""
    last = checkpoint_dir / artifacts.LAST_CKPT
    if last.is_file():
        yield last
    others = [p for p in checkpoint_dir.glob("*.ckpt") if p != last and p.is_file()]
    yield from sorted(others, key=lambda p: (global_step(p), p.stat().st_mtime), reverse=True)


def _warn_damaged(original: Path, aside: Path, reason: str, chosen: Path | None) -> None:
    then = (
        f"resuming from {chosen.name}, the newest intact checkpoint there, instead"
        if chosen is not None
        else "no intact checkpoint is left there, so this training starts again from the beginning"
    )
    log.warning(
        "checkpoint %s is damaged: %s (a write was cut short, e.g. by a kill or a crash). It was "
        "renamed %s, not deleted; %s. Delete %s once you no longer need it.",
        original, reason, aside.name, then, aside,
    )

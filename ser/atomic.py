"""Atomic file writes: readers never see a half-written label file, metric file or checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The temporary file lives in the same directory so that the final ``os.replace`` is a rename on
    one filesystem, which POSIX makes atomic. On error the temporary file is removed and ``path``
    keeps its old content.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes owner-only files; give the result the permissions open() would have.
        tmp.chmod(0o666 & ~current_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    """The process umask (reading it needs setting it; it is set straight back)."""
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_stream(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object]
) -> None:
    """``write`` into a file beside ``path``, made durable, then renamed onto ``path``.

    The file is flushed and fsynced before the rename and the directory after it: without the
    first, a crash of the machine (not only of the process) can leave ``path`` renamed yet
    empty on disk; without the second, the rename itself may not survive it.
    """
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(target.parent)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or removal in ``directory`` durable (POSIX: fsync the directory itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def _sides(target: Path) -> tuple[Path, Path]:
    return target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.old")


def replace_dir(target: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Write a folder beside ``target`` with ``write``, then swap it in.

    A kill while writing leaves the old folder as it was; a kill between the two renames leaves
    it as ``.<name>.old``, which :func:`restore_dir` puts back. So a reader finds the old
    folder or the new one whole, never a mix.
    """
    target = Path(target)
    partial, old = _sides(target)
    for stale in (partial, old):
        shutil.rmtree(stale, ignore_errors=True)
    write(partial)
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def restore_dir(target: str | os.PathLike[str]) -> None:
    """Undo what a kill inside :func:`replace_dir` left: the old folder returns if the new one
    never arrived; a half-written new one is removed."""
    target = Path(target)
    partial, old = _sides(target)
    if old.exists() and not target.exists():
        old.rename(target)
    for stale in (partial, old):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def temp_files_beside(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Inside: ``tempfile``'s default folder is ``.<name>.scratch`` beside ``target``.

    For libraries that stage copies in ``TMPDIR`` (MLflow's ``log_model`` copies the whole model
    there): a kill would orphan the copy in ``TMPDIR``, in memory on a tmpfs. Beside ``target``
    it lands on the disk that holds the model anyway, and the next call removes what a killed
    one left. One writer of ``target`` at a time, as for ``target`` itself.
    """
    target = Path(target)
    scratch = target.with_name(f".{target.name}.scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    previous = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)

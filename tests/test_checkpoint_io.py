"""Checkpoints survive any kill: written beside their target and renamed, never through TMPDIR;
a damaged one is set aside and the newest intact one resumed from."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ser.atomic import temp_files_beside
from ser.checkpoint_io import (
    PARTIAL_WRITES,
    CheckpointIO,
    damage,
    global_step,
    resume_point,
)
from ser.config import TrainingConfig
from ser.data.synthetic import DemoCorpus
from ser.training import build_trainer, last_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, step: int) -> Path:
    checkpoint = {"global_step": step, "state_dict": {"w": torch.arange(256.0) + step}}
    CheckpointIO().save_checkpoint(checkpoint, path)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture()
def empty_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tempfile``'s folder pointed at an empty one, to see whether anything lands there."""
    folder = tmp_path / "TMPDIR"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# --------------------------------------------------------------------------- writing

def test_save_writes_beside_the_target_and_never_in_tmpdir(
    tmp_path: Path, empty_tmpdir: Path
) -> None:
    path = _write(tmp_path / "checkpoints" / "last.ckpt", 3)
    assert damage(path) is None and global_step(path) == 3
    assert os.listdir(path.parent) == ["last.ckpt"]
    assert not os.listdir(empty_tmpdir)
    CheckpointIO().remove_checkpoint(path)
    assert not path.exists()


def test_a_write_cut_short_leaves_the_previous_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "last.ckpt", 1)

    def half_then_die(obj: object, handle: Any) -> None:
        handle.write(b"PK\x03\x04 some of the bytes")
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        CheckpointIO().save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert global_step(path) == 1 and damage(path) is None


def test_build_trainer_writes_checkpoints_with_ser_checkpoint_io(tmp_path: Path) -> None:
    trainer = build_trainer(TrainingConfig(), tmp_path, max_steps=1)
    assert isinstance(trainer.strategy.checkpoint_io, CheckpointIO)


# --------------------------------------------------------------------------- choosing

def test_damaged_checkpoints_are_set_aside_for_the_newest_intact_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "checkpoints"
    good = _write(folder / "epoch=0-step=4.ckpt", 4)
    _truncate(_write(folder / "last.ckpt", 12))
    (folder / "epoch=1-step=8.ckpt").write_bytes(b"")
    partial = folder / ".last.ckpt.k2j4x1.tmp"
    partial.write_bytes(b"PK\x03\x04")
    with caplog.at_level(logging.WARNING, logger="ser.checkpoint_io"):
        assert resume_point(folder) == good
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt.damaged", "last.ckpt.damaged",
    ]  # fmt: skip
    assert (folder / "last.ckpt.damaged").stat().st_size > 0  # kept, not emptied
    text = caplog.text
    assert f"checkpoint {folder / 'last.ckpt'} is damaged" in text and "truncated" in text
    assert f"checkpoint {folder / 'epoch=1-step=8.ckpt'} is damaged: it is empty" in text
    assert "resuming from epoch=0-step=4.ckpt" in text


def test_no_intact_checkpoint_means_starting_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "checkpoints"
    _truncate(_write(folder / "last.ckpt", 6))
    (folder / "epoch=0-step=3.ckpt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ser.checkpoint_io"):
        assert resume_point(folder) is None
    assert not list(folder.glob("*.ckpt"))
    assert "starts again from the beginning" in caplog.text
    assert resume_point(tmp_path / "absent") is None


def test_altered_bytes_fail_the_crc_check(tmp_path: Path) -> None:
    path = _write(tmp_path / "last.ckpt", 5)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: the zip structure stays whole
    path.write_bytes(bytes(data))
    assert "fails its CRC check" in (damage(path) or "")


def test_an_intact_last_ckpt_is_chosen_and_nothing_else_touched(tmp_path: Path) -> None:
    folder = tmp_path / "fold" / "checkpoints"
    last = _write(folder / "last.ckpt", 9)
    (folder / "epoch=0-step=3.ckpt").write_bytes(b"")  # not looked at: last.ckpt is whole
    assert last_checkpoint(tmp_path / "fold") == last
    assert (folder / "epoch=0-step=3.ckpt").exists()


def test_a_second_damage_never_overwrites_the_first(tmp_path: Path) -> None:
    for _ in range(2):
        (tmp_path / "last.ckpt").write_bytes(b"")
        assert resume_point(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt.damaged", "last.ckpt.damaged.2",
    ]  # fmt: skip


def test_library_temp_files_go_beside_the_target(tmp_path: Path, empty_tmpdir: Path) -> None:
    model = tmp_path / "model"
    (tmp_path / ".model.scratch").mkdir()  # what a killed log_model left
    with temp_files_beside(model) as scratch:
        assert Path(tempfile.mkdtemp()).parent == scratch
    assert tempfile.gettempdir() == str(empty_tmpdir)
    assert not list(tmp_path.glob(".model.*")) and not os.listdir(empty_tmpdir)


# --------------------------------------------------------------------------- end to end

# Runs an entry point (argv[1:]) and SIGKILLs it halfway through writing its Nth checkpoint:
# torch.save into a checkpoint's temporary file writes half the bytes, then the process dies.
KILL_INSIDE_NTH_SAVE = r"""
import io, os, runpy, signal, sys
import torch

nth, saves, real_save = int(os.environ["SER_TEST_KILL_IN_SAVE"]), 0, torch.save

def save(obj, f, *args, **kwargs):
    global saves
    if ".ckpt." in str(getattr(f, "name", "")):
        saves += 1
    if saves < nth:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: buffer.tell() // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
STEPS, EVERY = 30, 5


def _is_tmpfs(mount_point: str) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1:3] == [mount_point, "tmpfs"] for line in mounts)


@pytest.fixture()
def tmpfs_dir() -> Iterator[Path]:
    """A fresh folder on the tmpfs /dev/shm, to be TMPDIR on another filesystem than outputs."""
    if not Path("/proc/mounts").is_file() or not _is_tmpfs("/dev/shm"):
        pytest.skip("/dev/shm is not a tmpfs here")
    folder = Path(tempfile.mkdtemp(prefix="ser-test-checkpoint-io-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _files_in(folder: Path) -> list[str]:
    # ser's host-wide lock files (ser.tracking, ser.search) live in TMPDIR on purpose: empty,
    # kept, and not left by a kill. torch makes empty cache folders there as it imports.
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not (p.name.startswith("ser-") and p.suffix == ".lock"))


@pytest.mark.slow
def test_a_kill_inside_a_checkpoint_write_costs_only_that_checkpoint(
    corpus: DemoCorpus, tmp_path: Path, tracking_uri: str, tmpfs_dir: Path
) -> None:
    out = tmp_path / "tapt"
    command = [
        str(ROOT / "entrypoints" / "tapt_pretrain.py"),
        "--datadir", str(corpus.audio_dir),
        "--labelpath", str(corpus.label_dir / "fold_1.json"),
        "--output_dir", str(out), "--training_step", str(STEPS), "--warmup_step", "2",
        "--checkpoint_every", str(EVERY), "--batch_size", "4", "--keep_checkpoints", "true",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "TMPDIR": str(tmpfs_dir)}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_INSIDE_NTH_SAVE, *command], capture_output=True, text=True,
        env={**env, "SER_TEST_KILL_IN_SAVE": "3"}, timeout=600,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    folder = out / "fold_1" / "checkpoints"
    last = folder / "last.ckpt"
    (partial,) = folder.glob(PARTIAL_WRITES)  # the cut write, under a temporary name only
    assert damage(last) is None and global_step(last) == 2 * EVERY
    assert _files_in(tmpfs_dir) == []  # nothing staged in TMPDIR, so nothing orphaned there

    # What Lightning's own writer left after such a kill: the cut bytes under the final name
    # (its copy out of TMPDIR), beside an older intact checkpoint.
    older = last.rename(folder / f"epoch=0-step={2 * EVERY}.ckpt")
    shutil.copyfile(partial, last)
    cut = partial.stat().st_size
    rerun = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env,
                           timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"checkpoint {last} is damaged" in rerun.stderr
    assert f"resuming from {older}" in rerun.stderr  # not from the start
    assert global_step(last) == STEPS and damage(last) is None
    assert (folder / "last.ckpt.damaged").stat().st_size == cut > 0  # set aside, kept whole
    assert not list(folder.glob(PARTIAL_WRITES))
    assert _files_in(tmpfs_dir) == []

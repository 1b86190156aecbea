"""Sharing the machine: torch threads and loader workers per process, and hardware parameters
refused in seconds, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ser import cores, distributed
from ser.errors import SerInputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A machine of chosen cores and load, no thread variable set."""
    for name in (cores.THREADS_VARIABLE, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)

    def make(usable: int, busy: int = 0) -> None:
        monkeypatch.setattr(cores, "usable_cores", lambda: usable)
        monkeypatch.setattr(cores, "busy_cores", lambda: busy)

    before = torch.get_num_threads()
    yield make
    torch.set_num_threads(before)


@pytest.mark.parametrize(("usable", "busy", "processes", "threads"), [
    (2, 0, 1, 2),  # an idle laptop: both cores
    (2, 2, 1, 1),  # two other jobs running: one thread, not two spinning against them
    (2, 5, 1, 1),  # never fewer than one
    (2, 0, 2, 1),  # two ranks or search workers share two cores
    (16, 0, 2, 4),  # 8 cores a rank, 4 of them for its automatic loader workers
    (16, 4, 1, 8),  # 12 free cores, 4 of them for loader workers
])
def test_threads_are_the_free_cores_shared_among_processes_and_workers(
    machine, usable: int, busy: int, processes: int, threads: int  # noqa: ANN001
) -> None:
    machine(usable, busy)
    assert cores.set_threads(processes) == threads == torch.get_num_threads()


def test_thread_variables_override_the_choice(machine, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    machine(16, 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cores.set_threads(2) == 3
    monkeypatch.setenv(cores.THREADS_VARIABLE, "5")  # ser's own wins over OpenMP's
    assert cores.set_threads(2) == 5


@pytest.mark.parametrize(("usable", "processes", "workers"), [(2, 1, 0), (4, 2, 0), (8, 1, 4),
                                                              (64, 1, 4), (16, 2, 4)])
def test_automatic_loader_workers_leave_the_training_process_its_cores(
    machine, usable: int, processes: int, workers: int  # noqa: ANN001
) -> None:
    machine(usable)
    assert cores.loader_workers(-1, processes) == workers
    assert cores.loader_workers(3, processes) == 3  # as asked


def test_more_workers_than_cores_are_refused(machine) -> None:  # noqa: ANN001
    machine(2)
    cores.check_workers(2)
    with pytest.raises(SerInputError, match="num_workers=3: this process may use 2 core"):
        cores.check_workers(3)


def test_devices_beyond_the_machine_are_refused(machine) -> None:  # noqa: ANN001
    machine(2)
    assert distributed.requested_processes("cpu", "2") == 2
    assert distributed.requested_processes("cpu", "0,1") == 2
    with pytest.raises(SerInputError, match="devices='99': this machine has 2 usable CPU core"):
        distributed.requested_processes("cpu", "99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_refused() -> None:
    with pytest.raises(SerInputError, match="accelerator='gpu': this machine has no GPU"):
        distributed.requested_processes("gpu", "1")


def test_listed_device_ids_are_read() -> None:
    assert distributed.device_ids("2,3") == [2, 3]
    assert distributed.device_ids("1,") == [1]
    assert distributed.device_ids("2") is None


@pytest.mark.parametrize(("args", "message"), [
    (["--devices", "99"], "devices='99': this machine has"),
    (["--devices", "abc"], "devices='abc' is not a device count"),
    (["--num_workers", "64"], "num_workers=64: this process may use"),
    (["--lr", "nan"], "lr=nan must be a finite number > 0"),
    (["--lr", "inf"], "lr=inf must be a finite number > 0"),
    (["--maxseqlen", "nan"], "maxseqlen=nan must be"),
] + ([] if torch.cuda.is_available() else [
    (["--accelerator", "gpu"], "accelerator='gpu': this machine has no GPU"),
]))
def test_bad_hardware_and_numbers_fail_with_one_line_before_any_work(
    args: list[str], message: str, tmp_path: Path
) -> None:
    """Exit status 2 and one line naming the parameter; nothing written (no data, no outputs)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "vft.py"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no demo corpus built, no run started

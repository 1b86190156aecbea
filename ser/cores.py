"""How a process shares the machine's cores: torch threads and data-loading workers.

torch's default, one intra-op thread per core, is the worst choice on a small or busy machine:
on 2 cores with two other CPU-bound jobs, one ``tiny`` training step took 384 ms with two
threads (OpenMP threads spinning against each other and the other jobs) and 194 ms with one
(``benchmarks/threads.py``; idle, two threads are 20 % faster than one). So each process
takes its share of the cores that are free when it starts: the cores it may run on (its CPU
affinity, which containers and SLURM set), less the other jobs' load (the 1-minute load
average), divided among the processes sharing them (DDP ranks or search workers on this
machine), less its data-loading workers. When in doubt the
count errs low: one thread too few costs a fraction, one too many on busy cores costs a
multiple. ``SER_NUM_THREADS``, then ``OMP_NUM_THREADS``, override it.
"""

from __future__ import annotations

import os

import torch

from ser.errors import SerInputError

THREADS_VARIABLE = "SER_NUM_THREADS"  # threads per process, if you know better
MAX_AUTO_WORKERS = 4


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and SLURM set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_cores() -> int:
    """Cores other work keeps busy now: the 1-minute load average, rounded."""
    try:
        return round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this system
        return 0


def loader_workers(requested: int, processes: int = 1) -> int:
    """Data-loading worker processes per training process (``requested``; -1: chosen here).

    Automatic: none with two cores or fewer per process (a worker would take a core from the
    training process itself), else half of them, at most :data:`MAX_AUTO_WORKERS`.
    """
    if requested >= 0:
        return requested
    cores = usable_cores() // max(processes, 1)
    return 0 if cores <= 2 else min(MAX_AUTO_WORKERS, cores // 2)


def check_workers(requested: int) -> None:
    """Refuse more data-loading workers than this process has cores, before any work."""
    cores = usable_cores()
    if requested > cores:
        raise SerInputError(
            f"num_workers={requested}: this process may use {cores} core(s), and each worker "
            f"is a process of its own; pass at most {cores}, or -1 to choose from the cores"
        )


def torch_threads(processes: int, workers: int = 0) -> int:
    """Intra-op threads for one of ``processes`` sharing this machine, each with ``workers``
    data-loading workers (see the module docstring)."""
    for name in (THREADS_VARIABLE, "OMP_NUM_THREADS"):
        text = os.environ.get(name, "").strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    free = usable_cores() - busy_cores()
    return max(1, free // max(processes, 1) - workers)


def set_threads(processes: int, num_workers: int = -1) -> int:
    """Give torch this process's share of the cores (:func:`torch_threads`); returns it."""
    threads = torch_threads(processes, loader_workers(num_workers, processes))
    torch.set_num_threads(threads)
    return threads

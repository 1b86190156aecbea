"""Many processes, one run: who this process is, and what the ranks share.

Data-parallel training runs on existing launchers only: ``torchrun`` (one machine or several,
``--rdzv_backend c10d``), SLURM's ``srun``, or, for ``devices=N`` on one machine, the entry point
itself handing over to ``torchrun`` before it does anything else (:func:`relaunch_command`). In
every case all ranks start together and run the same entry point; :func:`start` joins the
process group before any work, so that everything after it (the MLflow look-ups, which only
global rank 0 makes, the samplers, which shard by the group) sees every rank from the start.
Lightning's Trainer then finds the group made and uses it.

Which environment launched us is read with Lightning's cluster environments (torchelastic, then
SLURM); none found means one process.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import (
    ClusterEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from ser import cores
from ser.errors import SerInputError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def nodes(self) -> int:
        return max(self.size // self.local_size, 1)

    @property
    def is_zero(self) -> bool:
        return self.rank == 0


def cluster_environment() -> ClusterEnvironment | None:
    """The launcher's environment when one started this process, else None."""
    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return SLURMEnvironment()
    return None


def _local_size(environment: ClusterEnvironment) -> int:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        text = os.environ.get(name, "")
        if text.isdigit():
            return int(text)
    return max(environment.world_size() // int(os.environ.get("SLURM_NNODES", "1")), 1)


def world() -> World:
    """Where this process stands (one process when no group was joined)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    environment = cluster_environment()
    local_size = _local_size(environment) if environment else dist.get_world_size()
    rank = dist.get_rank()
    return World(rank, rank % local_size, dist.get_world_size(), local_size)


def start(accelerator: str = "auto", num_workers: int = -1) -> World:
    """Join the launcher's process group (once), and give this process its share of the cores
    (``ser.cores``; ``num_workers``: its data-loading workers, -1 automatic).

    Called by every entry point before any work."""
    environment = cluster_environment()
    if environment is None or environment.world_size() < 2:
        cores.set_threads(1, num_workers)
        return World()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", environment.main_address)
        os.environ.setdefault("MASTER_PORT", str(environment.main_port))
        dist.init_process_group(
            _backend(accelerator), rank=environment.global_rank(),
            world_size=environment.world_size(),
        )  # fmt: skip
        atexit.register(stop)  # also when the work ends in an error
    here = world()
    # srun gives each task its own cores already; torchrun's ranks share the machine's.
    cores.set_threads(1 if isinstance(environment, SLURMEnvironment) else here.local_size,
                      num_workers)
    log.info("rank %d of %d (%d on this machine) joined", here.rank, here.size, here.local_size)
    if not here.is_zero:  # one rank tells people what happened; the others only warn
        logging.getLogger("ser").setLevel(logging.WARNING)
    return here


def stop() -> None:
    """Leave the process group (every rank, once its work is done): gloo's threads must be
    joined before the interpreter exits, or the process aborts on its way out."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _backend(accelerator: str) -> str:
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "nccl" if gpu else "gloo"


def is_zero() -> bool:
    return world().is_zero


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if world().size == 1:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    size = world().size
    if size == 1:
        return [value]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, value)
    return out


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` for evaluation: every ``size``-th from ``rank``, topped up
    with items from the start so that every rank has as many (Lightning needs a batch on every
    rank). Whoever gathers the results drops the repeats by name (:func:`first_of_each`)."""
    here = world()
    mine = list(items[here.rank :: here.size])
    wanted = -(-len(items) // here.size)
    return mine + list(items[: wanted - len(mine)])


def first_of_each(names: Sequence[str]) -> list[int]:
    """Positions of each name's first occurrence: what is left of gathered shards once the
    items :func:`shard` repeated are dropped, so each item counts exactly once."""
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        seen.setdefault(name, position)
    return sorted(seen.values())


# --- one machine, several devices: hand over to torchrun ---------------------------------------


def requested_processes(accelerator: str, devices: str) -> int:
    """How many processes ``devices`` asks for on this machine; refuses what it does not have."""
    text = str(devices).replace(" ", "")
    gpus = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise SerInputError(
            f"accelerator={accelerator!r}: this machine has no GPU that torch can see; pass "
            "accelerator=cpu (or auto)"
        )
    if text == "auto":
        return max(gpus, 1)
    if text == "-1":
        return gpus or 1
    ids = device_ids(text)
    if ids is not None and gpus and max(ids) >= gpus:
        raise SerInputError(
            f"devices={devices!r}: this machine has GPUs 0 to {gpus - 1}; pass ids among them"
        )
    count = len(ids) if ids is not None else int(text)
    available = gpus or cores.usable_cores()
    if count > available:
        what = f"{gpus} GPU(s)" if gpus else f"{available} usable CPU core(s)"
        raise SerInputError(
            f"devices={devices!r}: this machine has {what}; pass at most {available}"
        )
    return count


def device_ids(devices: str) -> list[int] | None:
    """The device ids of ``devices`` when it lists them (``"0,1"``, ``"2,"``), else None."""
    text = str(devices).replace(" ", "")
    return [int(part) for part in text.split(",") if part] if "," in text else None


def relaunch_command(processes: int, argv: Sequence[str]) -> list[str]:
    """The command that runs this entry point again as ``processes`` ranks under torchrun."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}", *argv,
    ]  # fmt: skip


def relaunch_environment(devices: str, processes: int, num_workers: int) -> dict[str, str]:
    """What the ranks of :func:`relaunch_command` need beyond this environment: the GPUs a list
    of ids names (rank i then uses the i-th of them), and their share of the cores (torchrun
    would otherwise give each rank one thread). A variable the user set is kept."""
    wanted: dict[str, str] = {}
    ids = device_ids(devices)
    if ids is not None and torch.cuda.is_available():
        wanted["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
    wanted["OMP_NUM_THREADS"] = str(
        cores.torch_threads(processes, cores.loader_workers(num_workers, processes)))
    return {name: value for name, value in wanted.items() if name not in os.environ}

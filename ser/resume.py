"""Exact resume: the global random generators travel in every checkpoint.

Lightning's checkpoints hold the weights, optimizer and scheduler states, the loops' progress
and the training loader's position in its epoch (``ser.data.sampling.ResumableLoader``), but not
the state of torch's, numpy's and Python's global generators, which draw the masks, negatives
and dropout of every step. Without them a resumed run draws from the seed set at its restart,
and parts from the run it continues. :class:`RandomState` saves every rank's generators in each
checkpoint and puts them back when training resumes from one.

Stored as tensors and plain numbers, so a checkpoint still loads with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback

from ser import distributed

log = logging.getLogger(__name__)

State = dict[str, Any]


def collect() -> State:
    """This process's global random state: torch (CPU and every visible GPU), numpy, Python."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    version, words, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64),
                   "gauss": python_gauss},
    }


def restore(state: State) -> None:
    """Set this process's global random state to ``state`` (from :func:`collect`)."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda or torch.cuda.is_available():
        log.warning("the checkpoint's GPU random states (%d device(s)) do not fit this machine "
                    "(%d): GPU draws will not repeat the interrupted run's", len(cuda),
                    torch.cuda.device_count() if torch.cuda.is_available() else 0)
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["words"].tolist()), python["gauss"]))


class RandomState(Callback):
    """Saves every rank's global random state in each checkpoint; restores this rank's on resume.

    Lightning restores callbacks before training starts and before it iterates the training
    loader again, so nothing of the resumed run draws before the restored state; the training
    loader must not draw from the global generators either (``ResumableLoader`` has its own).
    """

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is dumped (rank 0 writes it): a collective.
        return {"ranks": distributed.gather(collect())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks", [])
        here = distributed.world()
        if len(ranks) != here.size:
            log.warning("the checkpoint holds the random state of %d process(es) and %d run now: "
                        "random draws will not repeat the interrupted run's", len(ranks),
                        here.size)
            return
        restore(ranks[here.rank])


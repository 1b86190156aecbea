"""Length-bucketed batches, of a fixed count or of a total of audio samples (dynamic batches).

Speech clips vary in length, and a batch is padded to its longest clip. Grouping clips of similar
length wastes less compute on padding; capping a batch's audio instead of its count keeps
memory flat while short clips go in larger batches. The recipe (RECIPE.md, "Bucket sampler"):
sort by length (capped at ``max_len``), cut into ``num_buckets`` equal buckets, each epoch shuffle
inside every bucket, concatenate, cut greedily into batches, drop or keep the remainder, shuffle
the batches. Distributed training shares one global batch list between ranks.

Dynamic batches close by one of two rules (``ser.config.DYNAMIC_BATCH_RULES``):

- ``"sum"``, the original's (FT-w2v2-ser ``SingleRandomBucketSampler``): an item joins the batch,
  and the batch closes as soon as its items' lengths SUM to the budget or more. The item that
  crosses the budget stays in the batch, so a batch holds at least the budget of audio (up to one
  item more) and its padded size may exceed it.
- ``"padded"``: an item starts a new batch when adding it would make the PADDED batch
  (``count * longest``) exceed the budget, so the padded tensor never exceeds it (an item longer
  than the budget makes a batch of its own). Padding counts against the budget, so batches
  carry a little less audio than the original's.

Resuming mid-epoch: the sampler's ``state_dict`` is its epoch and how many of that epoch's batches
it has yielded; after ``load_state_dict`` the next iteration yields only the rest. Training
iterates it through :class:`ResumableLoader`, whose state Lightning keeps in every checkpoint and
hands back on a restart (Lightning skips no batch itself: it expects the loader to).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from ser.config import DYNAMIC_BATCH_RULES
from ser.data.datasets import EpochIndex
from ser.errors import SerInputError

log = logging.getLogger(__name__)


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded batch tensors that is padding: (padded - real) / padded samples.

    A batch of ``n`` items is padded to ``n * max(length)`` samples. Pass the lengths the items
    really have in the batch (capped where the dataset crops).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    padded = sum(len(batch) * int(lengths[list(batch)].max()) for batch in batches if len(batch))
    real = sum(int(lengths[list(batch)].sum()) for batch in batches)
    return (padded - real) / padded if padded else 0.0


def _distributed_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    return num_replicas, rank


class _EpochRelay:
    """Passes ``set_epoch`` on to the batch sampler.

    Lightning calls ``set_epoch`` on ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``
    but never on the batch sampler itself, so the batch sampler exposes this as its ``sampler``.
    """

    def __init__(self, owner: BucketBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices grouped by length; a ``batch_sampler`` for ``DataLoader``.

    Give exactly one of ``batch_size`` (items per batch) or ``max_batch_samples`` (dynamic
    batches of about this many samples, closed by ``dynamic_batch_rule``: ``"padded"``, at most
    this many samples in the padded batch; ``"sum"``, the original's, until the items' lengths
    sum to at least this many; see the module docstring). ``max_len`` caps every length, as the
    dataset's crop does. With ``shuffle=False`` the order is fixed: sorted by length, no shuffling
    (for evaluation). Each epoch (``set_epoch``) draws a new order from ``(seed, epoch)``.

    Distributed: every rank builds the same global batch list and takes every
    ``num_replicas``-th batch from ``rank`` on. So that all ranks run the same number of steps,
    the list is padded by repeating batches from its start (or, with ``drop_last``, cut) to a
    multiple of ``num_replicas``. ``num_replicas`` and ``rank`` default to torch.distributed's
    world when it is initialised, else 1 and 0. With Lightning, pass
    ``Trainer(use_distributed_sampler=False)``: this sampler already does the sharding.

    ``drop_last`` drops the remainder: a last batch of fewer than ``batch_size`` items, or with
    dynamic batches the last batch of the greedy cut (the one that ran out of items).

    Stateful: ``state_dict()`` is ``{"epoch", "batches_yielded", "num_replicas"}`` (this rank's
    position in the epoch); after ``load_state_dict(state)`` the next iteration over that epoch
    starts after its first ``batches_yielded`` batches. ``set_epoch`` to another epoch starts that
    epoch from its first batch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int | None = None,
        max_batch_samples: int | None = None,
        num_buckets: int = 50,
        max_len: int | None = None,
        dynamic_batch_rule: str = "padded",
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        num_replicas, rank = _distributed_defaults(num_replicas, rank)
        _validate(lengths, batch_size, max_batch_samples, num_buckets, max_len, num_replicas, rank)
        if seed < 0:
            raise SerInputError(f"BucketBatchSampler: seed must be >= 0, got {seed}")
        if dynamic_batch_rule not in DYNAMIC_BATCH_RULES:
            raise SerInputError(
                f"BucketBatchSampler: dynamic_batch_rule must be one of {DYNAMIC_BATCH_RULES}, "
                f"got {dynamic_batch_rule!r}"
            )
        capped = np.asarray(lengths, dtype=np.int64)
        if max_len is not None:
            capped = np.minimum(capped, max_len)
        self.lengths = capped
        self.batch_size = batch_size
        self.max_batch_samples = max_batch_samples
        self.num_buckets = num_buckets
        self.max_len = max_len
        self.dynamic_batch_rule = dynamic_batch_rule
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._resume_at: int | None = None  # batches of self.epoch the next iteration skips
        self._start = 0  # where the current iteration began in its epoch
        self._yielded = 0  # batches of self.epoch yielded so far, skipped ones included
        # Stable sort: equal lengths keep dataset order, so shuffle=False is fully deterministic.
        order = np.argsort(self.lengths, kind="stable")
        self._buckets = np.array_split(order, min(num_buckets, len(order)))
        self._cache: tuple[int, list[list[int]]] | None = None
        if not self._rank_batches():
            raise SerInputError(
                f"BucketBatchSampler makes no batch for rank {rank} of {num_replicas}: "
                f"{len(order)} items with drop_last=True fill fewer batches than replicas; "
                "use drop_last=False or a smaller batch_size / max_batch_samples"
            )

    @property
    def sampler(self) -> _EpochRelay:
        return _EpochRelay(self)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (seeded by ``(seed, epoch)``) from the next iteration on."""
        epoch = int(epoch)
        if epoch != self.epoch:
            # A resume point belongs to its own epoch; Lightning re-sets the loaded one unchanged.
            self._resume_at, self._start, self._yielded = None, 0, 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """This rank's position: the epoch and how many of its batches were yielded so far."""
        return {"epoch": self.epoch, "batches_yielded": self._yielded,
                "num_replicas": self.num_replicas}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at ``state``: the next iteration yields the rest of its epoch."""
        done = int(state["batches_yielded"])
        replicas = int(state.get("num_replicas", self.num_replicas))
        if done < 0 or replicas < 1:
            raise SerInputError(f"BucketBatchSampler: not a sampler state: {dict(state)}")
        if replicas != self.num_replicas:
            # Positions are per rank. Round down: a batch may repeat, none is skipped.
            log.warning("resuming an epoch sharded over %d process(es) on %d: its batches are "
                        "not replayed exactly", replicas, self.num_replicas)
            done = done * replicas // self.num_replicas
        self.epoch = int(state["epoch"])
        self._resume_at, self._start, self._yielded = done, done, done

    @property
    def iteration_start(self) -> int:
        """Batches of the epoch that the current (or pending) iteration skipped: a resume point."""
        return self._start

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches of one epoch, before sharding (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        # Seeded by the pair, not by seed + epoch: with the sum, the run with seed s + 1 would
        # replay the epochs of the run with seed s shifted by one.
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle:
            order = np.concatenate([rng.permutation(bucket) for bucket in self._buckets])
        else:
            order = np.concatenate(self._buckets)
        batches = self._cut(order.tolist())
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def epoch_padding_fraction(self, epoch: int | None = None) -> float:
        """Padding share of one epoch's global batches (see ``padding_fraction``)."""
        return padding_fraction(self.global_batches(epoch), self.lengths)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the epoch is read at the first batch, after Lightning's set_epoch.
        batches = self._rank_batches()
        start = min(self._resume_at or 0, len(batches))
        self._resume_at, self._start, self._yielded = None, start, start
        for batch in batches[start:]:
            self._yielded += 1
            yield batch

    def __len__(self) -> int:
        return len(self._rank_batches())

    def _rank_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._shard(self.global_batches()))
        return self._cache[1]

    def _shard(self, batches: list[list[int]]) -> list[list[int]]:
        replicas = self.num_replicas
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % replicas]
        elif len(batches) % replicas:
            missing = replicas - len(batches) % replicas
            repeats = -(-missing // len(batches))  # fewer batches than replicas: repeat all
            batches = batches + (batches * repeats)[:missing]
        return batches[self.rank :: replicas]

    def _cut(self, order: list[int]) -> list[list[int]]:
        if self.batch_size is not None:
            batches = [
                order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)
            ]
            if self.drop_last and len(batches[-1]) < self.batch_size:
                batches.pop()
            return batches
        if self.dynamic_batch_rule == "sum":
            return self._cut_by_sum(order)
        return self._cut_by_samples(order)

    def _cut_by_sum(self, order: list[int]) -> list[list[int]]:
        """The original's rule: append, then close once the lengths sum to the budget."""
        budget = self.max_batch_samples
        batches: list[list[int]] = []
        batch: list[int] = []
        total = 0
        for index in order:
            batch.append(index)
            total += int(self.lengths[index])
            if total >= budget:
                batches.append(batch)
                batch, total = [], 0
        if batch and not self.drop_last:
            batches.append(batch)
        return batches

    def _cut_by_samples(self, order: list[int]) -> list[list[int]]:
        budget = self.max_batch_samples
        batches: list[list[int]] = []
        batch: list[int] = []
        longest = 0
        for index in order:
            length = int(self.lengths[index])
            if batch and (len(batch) + 1) * max(longest, length) > budget:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(index)
            longest = max(longest, length)
        if batch and not self.drop_last:
            batches.append(batch)
        return batches


class _EpochIndexed:
    """The batches of a :class:`BucketBatchSampler`, each index paired with the batch's epoch.

    Workers get a copy of the dataset when they start, and persistent ones keep it across
    epochs, so an epoch set on the dataset in the main process never reaches them; carried with
    each index, it decides the item's crop in whichever process loads it.
    """

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self._sampler = sampler

    def __len__(self) -> int:
        return len(self._sampler)

    def __iter__(self) -> Iterator[list[EpochIndex]]:
        for batch in self._sampler:
            yield [EpochIndex(self._sampler.epoch, index) for index in batch]


class ResumableLoader(DataLoader):
    """The training ``DataLoader`` over a :class:`BucketBatchSampler` that resumes mid-epoch.

    Lightning keeps a training loader's ``state_dict`` in its loop state in every checkpoint
    and, on a restart, calls ``load_state_dict`` before iterating it again; it expects the loader
    to yield only the batches not yet trained on. The state is the sampler's, counted in batches
    this loader delivered: with workers the sampler runs ahead by the batches being prefetched.

    ``dataset[EpochIndex(epoch, i)]`` is what the workers are asked for (see
    :class:`_EpochIndexed`). ``generator`` defaults to one seeded by the sampler's seed: each
    iteration draws the workers' base seed from it, and drawn from torch's global generator it
    would shift every later draw of a resumed run (which iterates once more than an
    uninterrupted one) against the uninterrupted run's.
    """

    def __init__(self, dataset: Dataset, batch_sampler: BucketBatchSampler, **options: Any) -> None:
        options.setdefault("generator", torch.Generator().manual_seed(batch_sampler.seed))
        super().__init__(dataset, batch_sampler=batch_sampler, **options)
        # (epoch, batches of it delivered) after the last batch handed out by this loader
        self._position: tuple[int, int] | None = None

    @property
    def _index_sampler(self) -> _EpochIndexed:  # what DataLoader iterators draw indices from
        return _EpochIndexed(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        self._position = None
        return self._deliver()

    def _deliver(self) -> Iterator[Any]:
        # A generator: the workers start, and the sampler reads its epoch, at the first batch.
        # Lightning calls iter() before set_epoch when it resumes; started then, workers would
        # prefetch from the epoch the sampler was at.
        sampler = self.batch_sampler
        for delivered, batch in enumerate(super().__iter__(), start=1):
            self._position = (sampler.epoch, sampler.iteration_start + delivered)
            yield batch

    def state_dict(self) -> dict[str, int]:
        state = self.batch_sampler.state_dict()
        # Nothing of the sampler's current epoch delivered yet: its own position is the one.
        if self._position is not None and self._position[0] == state["epoch"]:
            state["batches_yielded"] = self._position[1]
        return state

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)
        self._position = None

def _validate(
    lengths: Sequence[int],
    batch_size: int | None,
    max_batch_samples: int | None,
    num_buckets: int,
    max_len: int | None,
    num_replicas: int,
    rank: int,
) -> None:
    if (batch_size is None) == (max_batch_samples is None):
        raise SerInputError(
            "BucketBatchSampler needs exactly one of batch_size (items per batch) or "
            f"max_batch_samples (audio samples per batch); got batch_size={batch_size}, "
            f"max_batch_samples={max_batch_samples}"
        )
    for name, value, optional in (
        ("batch_size", batch_size, True),
        ("max_batch_samples", max_batch_samples, True),
        ("max_len", max_len, True),
        ("num_buckets", num_buckets, False),
    ):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            what = "an int >= 1" + (" or None" if optional else "")
            raise SerInputError(f"BucketBatchSampler: {name} must be {what}, got {value!r}")
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise SerInputError(
            f"BucketBatchSampler: need num_replicas >= 1 and 0 <= rank < num_replicas; got "
            f"num_replicas={num_replicas}, rank={rank}"
        )
    if len(lengths) == 0:
        raise SerInputError("BucketBatchSampler: lengths is empty; the dataset has no items")
    if min(lengths) < 0:
        raise SerInputError("BucketBatchSampler: lengths must be >= 0 (samples per item)")

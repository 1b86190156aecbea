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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from ser.config import DYNAMIC_BATCH_RULES
from ser.errors import SerInputError


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
        self.epoch = int(epoch)

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
        yield from self._rank_batches()

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

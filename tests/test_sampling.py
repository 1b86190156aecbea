from __future__ import annotations

import numpy as np
import pytest
from lightning_fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from ser.data.sampling import BucketBatchSampler, padding_fraction
from ser.errors import SerInputError

SR = 16_000


@pytest.fixture(scope="module")
def lengths() -> list[int]:
    """Utterance lengths like IEMOCAP's: mostly 1.5-5 s, a tail past 10 s."""
    rng = np.random.default_rng(1)
    seconds = np.clip(rng.lognormal(mean=np.log(3.0), sigma=0.55, size=503), 0.5, 20.0)
    return [int(s * SR) for s in seconds]


def flat(batches: list[list[int]]) -> list[int]:
    return [index for batch in batches for index in batch]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("sizing", [{"batch_size": 16}, {"max_batch_samples": 60 * SR}])
def test_every_index_once_per_epoch(lengths: list[int], shuffle: bool, sizing: dict) -> None:
    sampler = BucketBatchSampler(lengths, shuffle=shuffle, **sizing)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(flat(batches)) == list(range(len(lengths)))
        assert len(sampler) == len(batches)


def test_fixed_batch_size_respected(lengths: list[int]) -> None:
    batches = list(BucketBatchSampler(lengths, batch_size=16))
    sizes = sorted(len(batch) for batch in batches)
    assert sizes[1:] == [16] * (len(batches) - 1)
    assert sizes[0] == len(lengths) % 16
    dropped = list(BucketBatchSampler(lengths, batch_size=16, drop_last=True))
    assert [len(batch) for batch in dropped] == [16] * (len(lengths) // 16)


@pytest.mark.parametrize("max_len", [None, 8 * SR])
def test_dynamic_batches_respect_the_sample_budget(lengths: list[int], max_len: int | None) -> None:
    budget = 40 * SR
    sampler = BucketBatchSampler(lengths, max_batch_samples=budget, max_len=max_len)
    capped = np.minimum(lengths, max_len or np.inf)
    batches = list(sampler)
    sizes = [len(batch) for batch in batches]
    assert max(sizes) > min(sizes)  # short clips go in bigger batches
    for batch in batches:
        padded = len(batch) * capped[batch].max()
        assert padded <= budget or len(batch) == 1


def test_greedy_cut_fills_batches_and_isolates_overlong_items() -> None:
    lengths = [100, 100, 100, 1000, 100, 100]
    sampler = BucketBatchSampler(lengths, max_batch_samples=300, num_buckets=1, shuffle=False)
    assert list(sampler) == [[0, 1, 2], [4, 5], [3]]
    uncapped = BucketBatchSampler([100, 100, 1000], max_batch_samples=450, shuffle=False)
    assert list(uncapped) == [[0, 1], [2]]
    capped = BucketBatchSampler([100, 100, 1000], max_batch_samples=450, max_len=150, shuffle=False)
    assert list(capped) == [[0, 1, 2]]  # 1000 counts as 150


def test_dynamic_drop_last_drops_the_remainder() -> None:
    lengths = [100] * 7
    kept = list(BucketBatchSampler(lengths, max_batch_samples=300, shuffle=False))
    dropped = list(
        BucketBatchSampler(lengths, max_batch_samples=300, shuffle=False, drop_last=True)
    )
    assert kept == [[0, 1, 2], [3, 4, 5], [6]]
    assert dropped == kept[:2]


def test_bucketing_pads_less_than_random_batches(lengths: list[int]) -> None:
    rng = np.random.default_rng(0)
    order = rng.permutation(len(lengths)).tolist()
    random_batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    bucketed = BucketBatchSampler(lengths, batch_size=16)
    dynamic = BucketBatchSampler(lengths, max_batch_samples=16 * 3 * SR)
    random_padding = padding_fraction(random_batches, lengths)
    assert bucketed.epoch_padding_fraction() < random_padding / 3
    assert dynamic.epoch_padding_fraction() < random_padding / 3
    assert bucketed.epoch_padding_fraction() == padding_fraction(list(bucketed), lengths)


def test_padding_fraction_counts_padded_samples() -> None:
    # batch [0, 1] pads to 2 x 4 = 8 samples holding 6; batch [2] holds 5 of 5
    assert padding_fraction([[0, 1], [2]], [2, 4, 5]) == pytest.approx(2 / 13)
    assert padding_fraction([[0], [1]], [3, 7]) == 0.0


def test_epochs_differ_and_repeat_with_the_same_seed(lengths: list[int]) -> None:
    sampler = BucketBatchSampler(lengths, batch_size=16, seed=3)
    other = BucketBatchSampler(lengths, batch_size=16, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        other.set_epoch(epoch)
        orders.append(list(sampler))
        assert orders[-1] == list(other)
        assert list(sampler) == orders[-1]  # a second pass over one epoch repeats it
    assert orders[0] != orders[1] != orders[2]
    next_seed = BucketBatchSampler(lengths, batch_size=16, seed=4)
    assert list(next_seed) != orders[0]
    next_seed.set_epoch(0)
    assert list(next_seed) != orders[1]  # not seeded by seed + epoch


def test_within_bucket_shuffle_keeps_batches_of_similar_length(lengths: list[int]) -> None:
    sampler = BucketBatchSampler(lengths, batch_size=8, num_buckets=len(lengths) // 8)
    ranks = np.empty(len(lengths), dtype=int)
    ranks[np.argsort(lengths, kind="stable")] = np.arange(len(lengths))
    for batch in sampler:
        # buckets hold 8 or 9 items; a batch spans at most two adjacent ones
        assert ranks[batch].max() - ranks[batch].min() <= 17


def test_no_shuffle_is_sorted_and_fixed(lengths: list[int]) -> None:
    sampler = BucketBatchSampler(lengths, batch_size=16, shuffle=False)
    first = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == first
    assert flat(first) == np.argsort(lengths, kind="stable").tolist()


def rank_batches(lengths: list[int], replicas: int, epoch: int, **kwargs) -> list[list[list[int]]]:
    per_rank = []
    for rank in range(replicas):
        sampler = BucketBatchSampler(lengths, num_replicas=replicas, rank=rank, seed=7, **kwargs)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(sampler) == len(batches)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("sizing", [{"batch_size": 16}, {"max_batch_samples": 50 * SR}])
def test_distributed_shares_cover_everything_evenly(
    lengths: list[int], replicas: int, sizing: dict
) -> None:
    for epoch in range(4):
        per_rank = rank_batches(lengths, replicas, epoch, **sizing)
        assert len({len(batches) for batches in per_rank}) == 1
        everything = [index for batches in per_rank for index in flat(batches)]
        assert sorted(set(everything)) == list(range(len(lengths)))
        # repeats only come from padding: whole batches copied from the start of the epoch
        reference = BucketBatchSampler(lengths, seed=7, **sizing).global_batches(epoch)
        padding = len(per_rank[0]) * replicas - len(reference)
        assert 0 <= padding < replicas
        assert len(everything) == len(lengths) + len(flat(reference[:padding]))
        interleaved = [per_rank[r][i] for i in range(len(per_rank[0])) for r in range(replicas)]
        assert interleaved == reference + reference[:padding]


@pytest.mark.parametrize("replicas", [2, 3])
def test_distributed_drop_last_gives_disjoint_shares(lengths: list[int], replicas: int) -> None:
    per_rank = rank_batches(lengths, replicas, 1, max_batch_samples=50 * SR, drop_last=True)
    assert len({len(batches) for batches in per_rank}) == 1
    shares = [set(flat(batches)) for batches in per_rank]
    assert sum(len(share) for share in shares) == len(set().union(*shares))
    assert len(set().union(*shares)) > 0.8 * len(lengths)


def test_distributed_with_fewer_batches_than_replicas() -> None:
    per_rank = rank_batches([100, 200], 3, 0, batch_size=2)
    assert per_rank == [[[0, 1]]] * 3
    with pytest.raises(SerInputError, match="no batch for rank"):
        BucketBatchSampler([100, 200], batch_size=2, num_replicas=3, rank=0, drop_last=True)


def test_works_as_a_dataloader_batch_sampler_and_gets_epochs_from_lightning(
    lengths: list[int],
) -> None:
    sampler = BucketBatchSampler(lengths, batch_size=16)
    loader = DataLoader(list(range(len(lengths))), batch_sampler=sampler)
    _set_sampler_epoch(loader, 3)  # what Lightning's fit loop calls at every epoch
    assert sampler.epoch == 3
    assert [batch.tolist() for batch in loader] == sampler.global_batches(3)
    assert len(loader) == len(sampler)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of batch_size"),
        ({"batch_size": 4, "max_batch_samples": 100}, "exactly one of batch_size"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"batch_size": 2.5}, "batch_size must be"),
        ({"max_batch_samples": -1}, "max_batch_samples must be"),
        ({"batch_size": 4, "num_buckets": 0}, "num_buckets must be"),
        ({"batch_size": 4, "max_len": 0}, "max_len must be"),
        ({"batch_size": 4, "num_replicas": 2, "rank": 2}, "rank"),
        ({"batch_size": 4, "num_replicas": 0, "rank": 0}, "num_replicas"),
        ({"batch_size": 8, "drop_last": True}, "no batch"),
        ({"batch_size": 2, "seed": -1}, "seed must be"),
    ],
)
def test_parameter_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(SerInputError, match=match):
        BucketBatchSampler([100, 200, 300], **kwargs)


def test_length_errors() -> None:
    with pytest.raises(SerInputError, match="lengths is empty"):
        BucketBatchSampler([], batch_size=2)
    with pytest.raises(SerInputError, match="lengths must be >= 0"):
        BucketBatchSampler([5, -1], batch_size=2)


# --- the original's dynamic batches (dynamic_batch_rule="sum") ---------------------------------


def _original_cut(order: list[int], lengths: np.ndarray, budget: int) -> list[list[int]]:
    """FT-w2v2-ser's SingleRandomBucketSampler, rewritten: a batch ends at the first item whose
    running sum of lengths reaches the budget, that item included; the remainder is kept."""
    batches, start = [], 0
    while start < len(order):
        running = np.cumsum(lengths[order[start:]])
        reached = np.flatnonzero(running >= budget)
        end = start + (int(reached[0]) + 1 if len(reached) else len(running))
        batches.append(order[start:end])
        start = end
    return batches


@pytest.fixture(scope="module")
def iemocap_like() -> np.ndarray:
    """A fold's Train lengths like IEMOCAP's: lognormal, median 3.5 s, 0.6-34 s."""
    rng = np.random.default_rng(4)
    seconds = np.clip(rng.lognormal(mean=np.log(3.5), sigma=0.7, size=4400), 0.6, 34.0)
    return (seconds * SR).astype(np.int64)


def test_sum_rule_cuts_as_the_original(iemocap_like: np.ndarray) -> None:
    budget, cap = 250 * SR, 10 * SR
    capped = np.minimum(iemocap_like, cap)
    fixed = BucketBatchSampler(iemocap_like, max_batch_samples=budget, max_len=cap,
                               dynamic_batch_rule="sum", shuffle=False)
    order = np.argsort(capped, kind="stable").tolist()
    assert fixed.global_batches() == _original_cut(order, capped, budget)
    # Shuffled: the same rule on every batch; only the last one cut may fall short.
    shuffled = BucketBatchSampler(iemocap_like, max_batch_samples=budget, max_len=cap,
                                  dynamic_batch_rule="sum", seed=3)
    totals = [(capped[b].sum(), capped[b[:-1]].sum()) for b in shuffled.global_batches()]
    assert all(before < budget for _, before in totals)
    assert sum(total < budget for total, _ in totals) <= 1
    assert sorted(flat(shuffled.global_batches())) == list(range(len(iemocap_like)))


def test_sum_rule_carries_more_audio_than_padded(iemocap_like: np.ndarray) -> None:
    budget, cap = 250 * SR, 10 * SR
    capped = np.minimum(iemocap_like, cap)
    audio = {}
    for rule in ("sum", "padded"):
        sampler = BucketBatchSampler(iemocap_like, max_batch_samples=budget, max_len=cap,
                                     dynamic_batch_rule=rule, seed=1)
        batches = sampler.global_batches()
        audio[rule] = capped.sum() / len(batches) / SR  # seconds of audio per batch
        if rule == "padded":
            assert all(len(b) * capped[b].max() <= budget for b in batches)
    ratio = audio["sum"] / audio["padded"]
    print(f"audio per batch: sum {audio['sum']:.1f} s, padded {audio['padded']:.1f} s, "
          f"ratio {ratio:.3f}")
    assert audio["sum"] >= 250 and 1.02 < ratio < 1.15


def test_unknown_dynamic_batch_rule_is_refused() -> None:
    with pytest.raises(SerInputError, match="dynamic_batch_rule must be one of"):
        BucketBatchSampler([100, 200], max_batch_samples=300, dynamic_batch_rule="max")

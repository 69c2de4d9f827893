"""Bucket batch sampler: shared buckets, disjoint equal rank shards, per-epoch reseed, resume."""

import itertools

import pytest

from soar_ray.data.sampler import BucketBatchSampler

# 12 samples in bucket A, 7 in B, 3 in C, interleaved so the order of indices says nothing.
A, B, C = (64, 64), (64, 48), (48, 64)
BUCKETS = [A] * 12 + [B] * 7 + [C] * 3
BUCKETS = [BUCKETS[(5 * i) % len(BUCKETS)] for i in range(len(BUCKETS))]  # 5 is coprime to 22


def _sampler(**kwargs) -> BucketBatchSampler:
    return BucketBatchSampler(BUCKETS, **{"batch_size": 2, **kwargs})


def test_batches_share_a_bucket_and_cover_each_sample_once() -> None:
    sampler = _sampler(drop_last=False)
    # Hand count: ceil(12/2) + ceil(7/2) + ceil(3/2) = 6 + 4 + 2 = 12 batches.
    assert len(sampler) == 12
    batches = sampler.epoch_batches(0)
    for batch in batches:
        assert len({BUCKETS[i] for i in batch}) == 1
    assert sorted(i for batch in batches for i in batch) == list(range(len(BUCKETS)))
    # drop_last: 6 + 3 + 1 = 10 full batches; one sample of B and one of C left out.
    dropped = _sampler()
    assert len(dropped) == 10
    assert all(len(batch) == 2 for batch in dropped.epoch_batches(0))


def test_ranks_are_disjoint_and_equal_in_count() -> None:
    # 10 full batches over 3 ranks: 3 each, the tenth is dropped so all ranks stay in step.
    ranks = [_sampler(rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in ranks] == [3, 3, 3]
    for epoch in range(3):
        shards = [[i for batch in s.epoch_batches(epoch) for i in batch] for s in ranks]
        assert [len(shard) for shard in shards] == [6, 6, 6]
        assert len(set(itertools.chain(*shards))) == 18
        single = {tuple(b) for b in _sampler().epoch_batches(epoch)}
        assert {tuple(b) for s in ranks for b in s.epoch_batches(epoch)} <= single


def test_reseeded_each_epoch_with_seed_plus_epoch() -> None:
    sampler = _sampler(seed=7)
    epochs = [sampler.epoch_batches(epoch) for epoch in range(3)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert _sampler(seed=7).epoch_batches(1) == epochs[1]  # deterministic
    assert _sampler(seed=8).epoch_batches(0) == epochs[1]  # the rule is seed + epoch


def test_iteration_walks_epochs_and_batch_at_agrees() -> None:
    sampler = _sampler(world_size=2, rank=1)
    stream = list(itertools.islice(sampler.iter_forever(), 12))
    assert [epoch for epoch, _ in stream] == [0] * 5 + [1] * 5 + [2] * 2
    assert stream == [sampler.batch_at(step) for step in range(12)]
    assert sampler.state_dict()["epoch"] == 2 and sampler.state_dict()["position"] == 2
    # Plain iteration yields one epoch at a time (the DataLoader protocol).
    fresh = _sampler(world_size=2, rank=1)
    assert list(fresh) == [batch for _, batch in stream[:5]]
    assert list(fresh) == [batch for _, batch in stream[5:10]]


@pytest.mark.parametrize("num_consumed", [0, 3, 5, 7])  # 5 ends an epoch exactly
def test_resume_continues_with_the_same_batches(num_consumed: int) -> None:
    reference = list(itertools.islice(_sampler(seed=3, world_size=2).iter_forever(), 15))
    first = _sampler(seed=3, world_size=2)
    consumed = list(itertools.islice(first.iter_forever(), num_consumed))
    state = first.state_dict()
    resumed = _sampler(seed=3, world_size=2)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(resumed.iter_forever(), 15 - num_consumed))
    assert consumed + rest == reference


def test_state_from_another_setup_is_refused() -> None:
    state = _sampler(seed=3).state_dict()
    with pytest.raises(ValueError, match="seed=3 does not match this sampler's 4"):
        _sampler(seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size=1 does not match"):
        _sampler(seed=3, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid epoch=0, position=11"):
        _sampler(seed=3).load_state_dict({**state, "position": 11})


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fewer than world_size=11"):
        _sampler(world_size=11)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        _sampler(batch_size=0)
    with pytest.raises(ValueError, match="rank=2, world=2"):
        _sampler(rank=2, world_size=2)
    with pytest.raises(ValueError, match="step must be non-negative"):
        _sampler().batch_at(-1)

"""ShardSampler: deterministic permutations, disjoint rank parts, drop-last, exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from ganray.models.errors import CheckpointError, DataError
from ganray.workers.sharding import ShardSampler


def _epoch_reads(n: int, global_batch: int, world: int, seed: int = 7) -> list[np.ndarray]:
    """Indices read by each rank over one epoch."""
    samplers = [ShardSampler(n, global_batch, seed, rank=r, world=world) for r in range(world)]
    reads = [[s.next_indices() for _ in range(s.batches_per_epoch)] for s in samplers]
    return [np.concatenate(r) for r in reads]


def test_three_workers_read_every_index_exactly_once_per_epoch() -> None:
    reads = _epoch_reads(n=60, global_batch=12, world=3)
    everything = np.concatenate(reads)
    assert everything.dtype == np.int64
    assert np.array_equal(np.sort(everything), np.arange(60))
    assert all(len(r) == 20 for r in reads)


def test_drop_last_reads_no_index_twice_and_skips_the_partial_batch() -> None:
    n, global_batch = 64, 12  # 5 full batches, 4 samples dropped
    sampler = ShardSampler(n, global_batch, seed=3, world=3)
    assert sampler.batches_per_epoch == 5
    everything = np.concatenate(_epoch_reads(n, global_batch, world=3, seed=3))
    assert len(everything) == 60
    assert len(np.unique(everything)) == 60
    assert everything.min() >= 0 and everything.max() < n


def test_same_seed_same_shards_and_different_seed_differs() -> None:
    a = ShardSampler(100, 20, seed=11, rank=1, world=2)
    b = ShardSampler(100, 20, seed=11, rank=1, world=2)
    c = ShardSampler(100, 20, seed=12, rank=1, world=2)
    draws_a = [a.next_indices() for _ in range(12)]
    draws_b = [b.next_indices() for _ in range(12)]
    draws_c = [c.next_indices() for _ in range(12)]
    assert all(np.array_equal(x, y) for x, y in zip(draws_a, draws_b))
    assert not all(np.array_equal(x, y) for x, y in zip(draws_a, draws_c))


def test_each_epoch_has_its_own_permutation_and_epoch_advances() -> None:
    sampler = ShardSampler(40, 10, seed=5)
    first = np.concatenate([sampler.next_indices() for _ in range(4)])
    assert (sampler.epoch, sampler.position) == (1, 0)
    second = np.concatenate([sampler.next_indices() for _ in range(4)])
    assert sampler.epoch == 2
    assert np.array_equal(np.sort(first), np.arange(40))
    assert np.array_equal(np.sort(second), np.arange(40))
    assert not np.array_equal(first, second)


def test_union_of_workers_per_step_equals_one_workers_batch() -> None:
    single = ShardSampler(90, 18, seed=2)
    parts = [ShardSampler(90, 18, seed=2, rank=r, world=3) for r in range(3)]
    for _ in range(12):  # crosses two epoch boundaries (5 batches per epoch)
        whole = single.next_indices()
        pieces = [p.next_indices() for p in parts]
        assert all(len(p) == 6 for p in pieces)
        assert np.array_equal(np.concatenate(pieces), whole)


def test_state_dict_round_trip_continues_mid_epoch_identically() -> None:
    reference = ShardSampler(50, 10, seed=9, rank=1, world=2)
    for _ in range(7):  # epoch 1, position 2
        reference.next_indices()
    state = reference.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    assert all(type(v) is int for v in state.values())
    resumed = ShardSampler(50, 10, seed=9, rank=1, world=2)
    resumed.load_state_dict(dict(state))
    for _ in range(9):
        assert np.array_equal(resumed.next_indices(), reference.next_indices())
    assert resumed.state_dict() == reference.state_dict()


def test_resume_with_another_worker_count_keeps_the_global_order() -> None:
    two = [ShardSampler(48, 12, seed=4, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        for s in two:
            s.next_indices()
    four = [ShardSampler(48, 12, seed=4, rank=r, world=4) for r in range(4)]
    for s in four:
        s.load_state_dict(two[0].state_dict())
    for _ in range(5):
        assert np.array_equal(np.concatenate([s.next_indices() for s in four]),
                              np.concatenate([s.next_indices() for s in two]))


def test_mismatched_state_is_refused() -> None:
    state = ShardSampler(50, 10, seed=9).state_dict()
    with pytest.raises(CheckpointError, match="n=50"):
        ShardSampler(60, 10, seed=9).load_state_dict(state)
    with pytest.raises(CheckpointError, match="position"):
        ShardSampler(50, 10, seed=9).load_state_dict({"epoch": 0, "position": 5})


def test_invalid_sizes_name_both_numbers() -> None:
    with pytest.raises(DataError, match=r"128.*100"):
        ShardSampler(100, 128, seed=0)
    with pytest.raises(ValueError, match=r"10.*3 workers"):
        ShardSampler(100, 10, seed=0, world=3)
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(100, 10, seed=0, rank=2, world=2)


def test_real_batches_slice_a_device_copy_like_the_host_path() -> None:
    """The device path (data and each epoch's permutation uploaded once, sliced per step) reads
    the same rows as the host path, across epochs and after a rank change (split's shard swap).
    On this CPU-only machine the device copy is planted by hand: only the copy itself is CUDA's."""
    import torch

    from ganray.workers.data import TensorSource
    from ganray.workers.sharding import RealBatches

    source = TensorSource("t", torch.arange(40, dtype=torch.float32).reshape(20, 2))
    host = RealBatches(source, torch.device("cpu"))
    assert host.device_data is None  # only a GPU gets the device copy
    device = RealBatches(source, torch.device("cpu"))
    device.device_data = source.data.clone()
    a, b = ShardSampler(20, 6, seed=4, rank=1, world=2), ShardSampler(20, 6, seed=4, rank=1, world=2)
    uploads = []
    for step in range(10):  # 3 batches per epoch: crosses three epoch boundaries
        if step == 7:  # a new sampler for another shard continues in place, as split's swap does
            a_state = a.state_dict()
            a, b = ShardSampler(20, 6, seed=4, rank=0, world=2), ShardSampler(20, 6, seed=4, rank=0, world=2)
            a.load_state_dict(a_state)
            b.load_state_dict(a_state)
        expected = source.get(b.next_indices())
        got = device.next(a)
        assert torch.equal(got, expected), step
        uploads.append(device._perm[1])  # kept alive, so ids below are not reused
    # One permutation upload per epoch (epochs 0-3) plus one for the new shard's sampler.
    assert len({id(t) for t in uploads}) == 5


def test_a_state_saved_at_one_world_size_continues_at_another() -> None:
    from ganray.models.errors import CheckpointError
    from ganray.workers.sharding import sampler_state_for

    two = [ShardSampler(100, 8, 3, rank, 2) for rank in range(2)]
    for sampler in two:
        for _ in range(5):
            sampler.next_indices()
    saved = {f"rank{r}": s.state_dict() for r, s in enumerate(two)}
    # Shrunk to one replica, or grown to four: every rank takes the one position.
    one = ShardSampler(100, 8, 3, 0, 1)
    one.load_state_dict(sampler_state_for(saved, "rank0"))
    four = [ShardSampler(100, 8, 3, rank, 4) for rank in range(4)]
    for rank, sampler in enumerate(four):
        sampler.load_state_dict(sampler_state_for(saved, f"rank{rank}"))
    np.testing.assert_array_equal(np.concatenate([s.next_indices() for s in four]), one.next_indices())
    damaged = {"rank0": saved["rank0"], "rank1": {**saved["rank1"], "position": 1}}
    with pytest.raises(CheckpointError, match="disagree"):
        sampler_state_for(damaged, "rank2")

"""Deterministic data sharding: which sample indices each worker reads at every step.

One permutation of range(n) per (seed, epoch); global batch b of an epoch is slice
[b * global_batch, (b + 1) * global_batch) of it, and rank i of `world` takes the i-th contiguous
part of that slice. So N workers together read exactly the batch one worker would, the job's data
order does not depend on the worker count, and the last partial global batch of an epoch is
dropped so no sample is read twice in an epoch. The position (epoch, batch within the epoch) is
rank-independent, which lets a job resume mid-epoch, even with a different worker count.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ganray.models.errors import CheckpointError, DataError


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The int64 permutation of range(n) for (seed, epoch); independent streams per epoch."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n).astype(np.int64, copy=False)


class ShardSampler:
    """Hands rank `rank` of `world` its part of every global batch, epoch after epoch."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n < 1:
            raise DataError(f"the dataset is empty (n={n}); there is nothing to sample")
        if global_batch < 1 or world < 1:
            raise ValueError(f"global_batch ({global_batch}) and world ({world}) must be positive")
        if global_batch % world != 0:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} workers; "
                             "choose a batch size that is a multiple of the worker count")
        if global_batch > n:
            raise DataError(f"schedule.batch_size {global_batch} is larger than the dataset ({n} samples); "
                            "lower the batch size or use more data")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside 0..{world - 1}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative (got {seed})")
        self.n = int(n)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world = int(world)
        self.local_batch = self.global_batch // self.world
        self._epoch = 0
        self._position = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """Epochs completed: the epoch the next batch comes from."""
        return self._epoch

    @property
    def position(self) -> int:
        """Global batches already drawn in the current epoch (the next batch's index in it)."""
        return self._position

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def _permutation(self) -> np.ndarray:
        # Computed once per epoch: every step of the epoch slices the cached array.
        if self._perm_epoch != self._epoch:
            self._perm = epoch_permutation(self.n, self.seed, self._epoch)
            self._perm_epoch = self._epoch
        return self._perm

    def next_span(self) -> tuple[np.ndarray, int, int]:
        """(the epoch's whole permutation, start, stop): this rank's next indices are
        `perm[start:stop]`. A GPU replica uploads `perm` once per epoch and slices it on the device,
        instead of copying indices from the host every step. Moves on like `next_indices`."""
        perm = self._permutation()
        start = self._position * self.global_batch + self.rank * self.local_batch
        self._position += 1
        if self._position == self.batches_per_epoch:
            self._epoch += 1
            self._position = 0
        return perm, start, start + self.local_batch

    def next_indices(self) -> np.ndarray:
        """This rank's int64 indices for the next global batch; moves on to the next epoch at its end."""
        perm, start, stop = self.next_span()
        return perm[start:stop].copy()

    def state_dict(self) -> dict[str, int]:
        """Plain ints: the position plus what must match for the position to mean the same."""
        return {"epoch": self._epoch, "position": self._position, "n": self.n,
                "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where `state` left off (any rank / world with the same global batch)."""
        for key in ("n", "global_batch", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise CheckpointError(f"sampler state was saved with {key}={int(state[key])} but this job has "
                                      f"{key}={getattr(self, key)}; resume with the same data and batch size")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise CheckpointError(f"sampler state has epoch {epoch}, position {position}, outside "
                                  f"0..{self.batches_per_epoch - 1} batches per epoch; the checkpoint is damaged")
        self._epoch, self._position = epoch, position


def sampler_state_for(samplers: dict[str, dict[str, int]], key: str) -> dict[str, int]:
    """The sampler state a worker named `key` continues from, in a job state saved at any world size.

    Every rank's position (epoch, global batch within it) is the same number, so a world that
    grew (a rank the state does not name) takes any rank's; the states must agree, or the job
    state is damaged."""
    if key in samplers:
        return samplers[key]
    if not samplers:
        raise CheckpointError("the state holds no sampler position; the checkpoint is damaged")
    positions = {(int(s["epoch"]), int(s["position"])) for s in samplers.values()}
    if len(positions) != 1:
        raise CheckpointError(f"the state's samplers disagree on their position ({sorted(positions)}); "
                              "the checkpoint is damaged")
    return next(iter(samplers.values()))


# In-memory datasets up to this size are copied to a GPU once; larger ones stay on the host.
DEVICE_DATA_MAX_BYTES = 2 * 1024**3


class RealBatches:
    """Fetches a sampler's next rows onto the worker's device.

    On a GPU an in-memory dataset (up to DEVICE_DATA_MAX_BYTES) is copied to the device once, and
    so is each epoch's permutation: a step then slices on the device. Copying pageable host rows
    or indices every step would stall the launch queue of a launch-bound GPU round.

    With `labels` (a conditional GAN: int64, one per row of the source), `next_labelled` returns
    each row's class beside it: the same indices, so labels travel with their rows.
    """

    def __init__(self, source: Any, device: torch.device, labels: Optional[np.ndarray] = None) -> None:
        self.source = source
        self.device = device
        self.labels: Optional[torch.Tensor] = (
            None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64)).to(device))
        data = getattr(source, "data", None)
        fits = isinstance(data, torch.Tensor) and data.numel() * data.element_size() <= DEVICE_DATA_MAX_BYTES
        self.device_data: Optional[torch.Tensor] = (
            data.to(device=device, dtype=torch.float32) if device.type == "cuda" and fits else None)
        self._perm: tuple[Optional[np.ndarray], torch.Tensor] = (None, torch.empty(0, dtype=torch.long))

    def next(self, sampler: ShardSampler) -> torch.Tensor:
        """The rows `sampler.next_indices()` names, on the device (the sampler moves on)."""
        return self.next_labelled(sampler)[0]

    def next_labelled(self, sampler: ShardSampler) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(rows, their labels or None without `labels`) for the sampler's next indices."""
        if self.device_data is None:
            idx = sampler.next_indices()
            rows = self.source.get(idx).to(self.device, non_blocking=True)
            if self.labels is None:
                return rows, None
            return rows, self.labels.index_select(0, torch.from_numpy(idx).to(self.device))
        perm, start, stop = sampler.next_span()
        host_perm, device_perm = self._perm
        if host_perm is not perm:  # a new epoch (or a new shard's sampler)
            device_perm = torch.from_numpy(perm).to(self.device)
            self._perm = (perm, device_perm)
        idx_t = device_perm[start:stop]
        rows = self.device_data.index_select(0, idx_t)
        return rows, None if self.labels is None else self.labels.index_select(0, idx_t)


class RotatingShard:
    """The real rows of discriminator `index` of `count` in a split job, with their labels.

    Each discriminator reads its own shard (`ShardSampler` rank `index` of `count`); MD-GAN's swap
    (`swap_every_epochs` = E > 0) moves it to shard (index + epoch // E) mod count. The position is
    rank-independent, so the sampler of the new shard continues where the old one stopped, and a
    restored sampler finds its shard again from its epoch.
    """

    def __init__(self, batches: RealBatches, global_batch: int, seed: int, index: int, count: int,
                 swap_every_epochs: int = 0) -> None:
        self.batches = batches
        self.index, self.count = int(index), int(count)
        self.swap_every_epochs = int(swap_every_epochs)
        self.sampler = ShardSampler(len(batches.source), global_batch, seed, self.index, self.count)

    def shard(self) -> int:
        """The shard the next batch comes from."""
        if self.swap_every_epochs <= 0:
            return self.index
        return (self.index + self.sampler.epoch // self.swap_every_epochs) % self.count

    def next(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(rows, their labels or None) of this discriminator's next batch, on the device."""
        shard = self.shard()
        if shard != self.sampler.rank:
            s = self.sampler
            moved = ShardSampler(s.n, s.global_batch, s.seed, shard, self.count)
            moved.load_state_dict(s.state_dict())
            self.sampler = moved
        return self.batches.next_labelled(self.sampler)

"""Bucketed, rank-sharded, resumable batch sampler: every batch shares one (bw, bh) bucket.

The plan of an epoch is a pure function of `seed + epoch` and the bucket of every index: indices
are grouped by bucket, shuffled within their bucket, cut into batches of `batch_size`, and the
batches of all buckets are shuffled together. Every rank computes the same plan; rank r takes
batches r, r + W, r + 2W, ... (W = world size) and all ranks stop at floor(num_batches / W), so
collectives stay in lockstep. The batch count does not depend on the seed, so `len()` is the
same every epoch.

State is (epoch, position): the batches already handed out in this epoch. A DataLoader prefetches
batches ahead of the trainer, so with one, save the position the trainer has consumed (or use
`batch_at(step)`, which is stateless) rather than the sampler's own state.
"""

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


class BucketBatchSampler:
    """Batches of indices sharing one bucket, disjoint across ranks, reshuffled per epoch."""

    def __init__(
        self,
        buckets: Sequence[tuple[int, int]],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.drop_last = seed, drop_last
        self.num_samples = len(buckets)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            by_bucket.setdefault(tuple(bucket), []).append(index)
        # Sorted so the plan does not depend on the order buckets first appear in.
        self._groups = [np.asarray(by_bucket[key]) for key in sorted(by_bucket)]
        round_up = 0 if drop_last else batch_size - 1
        num_batches = sum((len(g) + round_up) // batch_size for g in self._groups)
        self.num_batches_per_rank = num_batches // world_size
        if self.num_batches_per_rank == 0:
            raise ValueError(
                f"{self.num_samples} samples in {len(self._groups)} buckets give {num_batches} "
                f"batches of {batch_size}, fewer than world_size={world_size}"
            )
        self.epoch, self.position = 0, 0
        self._cached_plan: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return self.num_batches_per_rank

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order."""
        if self._cached_plan is not None and self._cached_plan[0] == epoch:
            return self._cached_plan[1]
        rng = np.random.default_rng(self.seed + epoch)
        batches: list[list[int]] = []
        for group in self._groups:
            shuffled = rng.permutation(group)
            for start in range(0, len(shuffled), self.batch_size):
                chunk = shuffled[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk.tolist())
        order = rng.permutation(len(batches))[self.rank :: self.world_size]
        mine = [batches[i] for i in order[: self.num_batches_per_rank]]
        self._cached_plan = (epoch, mine)
        return mine

    def batch_at(self, step: int) -> tuple[int, list[int]]:
        """(epoch, batch) of global step `step` counted from epoch 0; ignores the state."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch, position = divmod(step, self.num_batches_per_rank)
        return epoch, self.epoch_batches(epoch)[position]

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; the next iteration starts the following epoch."""
        if self.position >= self.num_batches_per_rank:
            self.epoch, self.position = self.epoch + 1, 0
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            # Advance before handing out, so state saved after using this batch resumes past it.
            self.position += 1
            yield batch

    def iter_forever(self) -> Iterator[tuple[int, list[int]]]:
        """(epoch, batch) pairs over endless epochs, continuing from the current state."""
        while True:
            for batch in self:
                yield self.epoch, batch

    def state_dict(self) -> dict[str, Any]:
        """Position plus the settings a resumed run must share to see the same batches."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was saved; settings must match."""
        for key in ("seed", "batch_size", "world_size", "num_samples", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state {key}={state.get(key)!r} does not match this sampler's "
                    f"{getattr(self, key)!r}; the saved batch order cannot be continued"
                )
        epoch, position = state["epoch"], state["position"]
        if epoch < 0 or not 0 <= position <= self.num_batches_per_rank:
            raise ValueError(f"sampler state has invalid epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position

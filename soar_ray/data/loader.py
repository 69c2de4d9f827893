"""Step-indexed batches: batch k of a run is a pure function of k, so resume needs only the step.

A DataLoader over the steps (one item = one collated batch) prefetches in worker processes,
while `BucketBatchSampler.batch_at(step)` keeps the batch order exact across restarts.
"""

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from soar_ray.data.dataset import collate_samples
from soar_ray.data.sampler import BucketBatchSampler


class EpochDataset(Protocol):
    """A dataset whose `get(index, epoch)` returns one sample (image or cache dataset)."""

    def get(self, index: int, epoch: int) -> dict[str, Any]: ...


class StepBatches(torch.utils.data.Dataset):
    """Item k = the collated batch of step `first_step + k` for this sampler's rank."""

    def __init__(self, dataset: EpochDataset, sampler: BucketBatchSampler, first_step: int,
                 num_steps: int) -> None:  # fmt: skip
        self.dataset, self.sampler = dataset, sampler
        self.first_step, self.num_steps = first_step, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, k: int) -> dict[str, Any]:
        epoch, indices = self.sampler.batch_at(self.first_step + k)
        batch = collate_samples([self.dataset.get(i, epoch) for i in indices])
        batch["epoch"] = epoch
        return batch


def iter_batches(
    dataset: EpochDataset,
    sampler: BucketBatchSampler,
    *,
    first_step: int,
    num_steps: int,
    num_workers: int = 0,
) -> Iterator[dict[str, Any]]:
    """Batches of steps first_step .. first_step + num_steps - 1, prefetched by `num_workers`."""
    steps = StepBatches(dataset, sampler, first_step, num_steps)
    loader = torch.utils.data.DataLoader(
        steps,
        batch_size=None,  # items are whole batches already
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader

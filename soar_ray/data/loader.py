"""Step-indexed batches: step k's batches are a pure function of k, so resume needs only the step.

A DataLoader over the steps (one item = the batches of every data-parallel rank for one step)
prefetches in worker processes, while `BucketBatchSampler.batch_at(step)` keeps the batch order
exact across restarts.
"""

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from soar_ray.data.dataset import collate_samples
from soar_ray.data.sampler import BucketBatchSampler


class EpochDataset(Protocol):
    """A dataset whose `get(index, epoch)` returns one sample (image or cache dataset)."""

    def get(self, index: int, epoch: int) -> dict[str, Any]: ...


class StepBatches(torch.utils.data.Dataset):
    """Item k = [batch of rank r for step first_step + k, for r in ranks]."""

    def __init__(self, dataset: EpochDataset, samplers: Sequence[BucketBatchSampler],
                 first_step: int, num_steps: int) -> None:  # fmt: skip
        self.dataset, self.samplers = dataset, list(samplers)
        self.first_step, self.num_steps = first_step, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, k: int) -> list[dict[str, Any]]:
        batches = []
        for sampler in self.samplers:
            epoch, indices = sampler.batch_at(self.first_step + k)
            batch = collate_samples([self.dataset.get(i, epoch) for i in indices])
            batch["epoch"] = epoch
            batches.append(batch)
        return batches


def iter_batches(
    dataset: EpochDataset,
    samplers: Sequence[BucketBatchSampler],
    *,
    first_step: int,
    num_steps: int,
    num_workers: int = 0,
) -> Iterator[list[dict[str, Any]]]:
    """Per-rank batches of steps first_step .. first_step + num_steps - 1, prefetched."""
    steps = StepBatches(dataset, samplers, first_step, num_steps)
    loader = torch.utils.data.DataLoader(
        steps,
        batch_size=None,  # items are whole batches already
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader

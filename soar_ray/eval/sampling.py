"""Evaluation sampling, shared by `soar-ray eval` and a GRPO stage's in-training evaluation.

Every image is an `EvalItem` (prompt index, k-th image of that prompt, seed): its noise is a pure
function of (base seed, prompt index, k), so an image is the same whichever batch, worker or run
makes it, and a resumed evaluation makes only the missing ones. Batches go round-robin to the
rollout workers (ODE sampling with CFG, noise 0) and each decoded batch goes to the reward actors
as an object ref as soon as it exists, so scoring overlaps sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import ray

from soar_ray.cluster.groups import RolloutPool
from soar_ray.cluster.rewards import RewardHandle, RewardPool
from soar_ray.data.prompts import Prompt
from soar_ray.stages.loop import derived_seed
from soar_ray.workers.rollout import RolloutWorker


@dataclass(frozen=True)
class SamplingSettings:
    """How evaluation images are sampled: ODE steps, CFG scale, square side in pixels."""

    num_steps: int
    guidance: float
    resolution: int


@dataclass(frozen=True)
class EvalItem:
    """One evaluation image: the k-th image (`sample`) of prompt `prompt_index`, from `seed`."""

    prompt_index: int
    sample: int
    seed: int

    @property
    def name(self) -> str:
        """File stem under the reward CLI's naming rule: `<prompt index>_<k>`."""
        return f"{self.prompt_index}_{self.sample}"


def eval_items(num_prompts: int, images_per_prompt: int, seed: int) -> list[EvalItem]:
    """Every (prompt, k) of an evaluation, prompt-major, each with its own fixed seed."""
    return [
        EvalItem(i, k, derived_seed(seed, "eval", i, k))
        for i in range(num_prompts)
        for k in range(images_per_prompt)
    ]


@dataclass(frozen=True)
class EvalBatch:
    """One batch in flight: its items, the decoded images (a ref of uint8 [B, H, W, 3] on a
    rollout worker) and their scores."""

    items: list[EvalItem]
    images: ray.ObjectRef
    scores: RewardHandle


def submit_eval(
    rollouts: RolloutPool,
    reward_pool: RewardPool,
    prompts: Sequence[Prompt],
    items: Sequence[EvalItem],
    settings: SamplingSettings,
    batch_size: int,
    weights: Mapping[str, float],
    on_images: Callable[[EvalBatch, np.ndarray], None] | None = None,
) -> list[EvalBatch]:
    """Sample `items` in batches of `batch_size` on the rollout workers; as each batch finishes
    (a batch lost with its worker is sampled again first), score it with the rewards in `weights`
    and hand it to `on_images(batch, images)`. Returns once every batch is sampled, in order,
    while the last ones are still being scored."""
    chunks = [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]
    texts = [[prompts[item.prompt_index].text for item in chunk] for chunk in chunks]
    calls = [
        rollouts.submit(
            RolloutWorker.generate_images,
            chunk_texts,
            seeds=[item.seed for item in chunk],
            height=settings.resolution,
            width=settings.resolution,
            num_steps=settings.num_steps,
            guidance=settings.guidance,
        )  # fmt: skip
        for chunk, chunk_texts in zip(chunks, texts)
    ]
    batches: dict[int, EvalBatch] = {}
    for call in rollouts.finished(calls):
        k = calls.index(call)
        metadata = [prompts[item.prompt_index].metadata or None for item in chunks[k]]
        scores = reward_pool.submit(call.refs[0], texts[k], metadata, weights=weights)
        batches[k] = EvalBatch(chunks[k], call.refs[0], scores)
        if on_images is not None:
            on_images(batches[k], ray.get(call.refs[0]))
    return [batches[k] for k in range(len(calls))]

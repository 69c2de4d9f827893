"""A weighted sum of named rewards that keeps every component.

    rewards.load("multi", weights={"ocr": 1.0, "geneval": 0.5},
                 options={"geneval": {"detector": "mmdet", "mmdet_checkpoint": "..."}})

Every named reward scores the whole batch with the same prompts and metadata. The score is
sum_k weight_k * score_k; the components are every reward's own components plus each reward's
score under the reward's name. `device` and `batch_size` apply to every reward unless its own
options set them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rewards import load
from rewards.base import ImageLike, Reward, RewardOutput, check_batch


class MultiReward:
    """sum_k weights[k] * reward_k, with all components of all rewards."""

    name = "multi"

    def __init__(
        self,
        weights: Mapping[str, float],  # reward name -> weight
        options: Mapping[str, Mapping[str, Any]] | None = None,  # reward name -> its options
        device: str = "auto",  # default device of every reward
        batch_size: int = 16,  # default batch size of every reward
    ) -> None:
        if not weights:
            raise ValueError("multi: weights must name at least one reward")
        options = dict(options or {})
        unused = sorted(set(options) - set(weights))
        if unused:
            raise ValueError(f"multi: options given for {unused}, which have no weight")
        for name, weight in weights.items():
            if name == self.name:
                raise ValueError("multi: a multi reward cannot contain 'multi'")
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(
                    f"multi: weights[{name!r}] must be a finite number, got {weight!r}"
                )
        self.weights = {name: float(weight) for name, weight in weights.items()}
        defaults = {"device": device, "batch_size": batch_size}
        self.rewards: dict[str, Reward] = {
            name: load(name, **{**defaults, **options.get(name, {})}) for name in self.weights
        }

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """Weighted sum of the rewards' scores; their scores and components as components."""
        check_batch(self.name, images, prompts, metadata)
        total = np.zeros(len(images), dtype=np.float64)
        components: dict[str, np.ndarray] = {}
        for name, reward in self.rewards.items():
            out = reward.score(images, prompts, metadata)
            bad = np.flatnonzero(~np.isfinite(out.scores))
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"multi: reward {name!r} scored {out.scores[i]} on {prompts[i]!r}")
            for key, values in {name: out.scores, **out.components}.items():
                if key in components:
                    raise ValueError(f"multi: reward {name!r} repeats component name {key!r}")
                components[key] = values
            total += self.weights[name] * out.scores
        return RewardOutput(total, components)

"""Scoring: one reward model built from its `RewardConfig`, and the bad-score policy.

A reward that raises, or gives a NaN/inf score, is an error naming the reward and the prompt
(`on_bad_score: error`, the default), or the sample is dropped and counted (`drop`). When a batch
raises, its samples are scored one by one to find the prompt that fails, so an error can name it
and the drop policy loses only the samples that fail on their own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import rewards
from rewards.base import ImageLike, Reward, check_batch
from soar_ray.config import RewardConfig

Metadata = Sequence[Mapping[str, Any] | None] | None


class RewardScoreError(RuntimeError):
    """A reward raised or gave a non-finite score; the message names the reward and the prompt."""


@dataclass(frozen=True)
class ScoredChunk:
    """Scores of one scoring call: NaN where a sample was dropped, with the dropped indices."""

    scores: np.ndarray
    """Per-image scores [n], float64; NaN at dropped samples."""
    components: dict[str, np.ndarray] = field(default_factory=dict)
    """The reward's named components, each [n]; NaN at dropped samples."""
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Indices (into this call's batch) of the samples dropped under `on_bad_score: drop`."""
    seconds: float = 0.0
    """Wall time spent scoring."""


def reward_options(name: str, config: RewardConfig) -> dict[str, Any]:
    """The keyword options of `rewards.load`: the reward's own options plus device and batch size."""
    for key in ("device", "batch_size"):
        if key in config.options:
            raise ValueError(
                f"rewards.{name}.options.{key}: set rewards.{name}.{key} instead "
                "(it is a field of every reward)"
            )
    return {**config.options, "device": config.device, "batch_size": config.batch_size}


class RewardScorer:
    """One reward model and its bad-score policy; stateless between calls."""

    def __init__(self, name: str, config: RewardConfig, reward: Reward | None = None) -> None:
        self.name = name
        self.config = config
        # An already built model is used as it is (the `rewards check` command times loading).
        self.reward = (
            reward if reward is not None else rewards.load(name, **reward_options(name, config))
        )

    def score(
        self, images: Sequence[ImageLike], prompts: Sequence[str], metadata: Metadata = None
    ) -> ScoredChunk:
        """Score a batch; bad samples raise RewardScoreError or are dropped, as configured."""
        start = time.perf_counter()
        rows = check_batch(self.name, images, prompts, metadata)
        batch_error: Exception | None = None
        try:
            out = self.reward.score(images, prompts, rows)
            scores, components = out.scores.copy(), {k: v.copy() for k, v in out.components.items()}
            failures: dict[int, Exception] = {}
        except Exception as exc:  # any reward error: find the prompts that cause it
            batch_error = exc
            scores, components, failures = self._score_each(images, prompts, rows)
        if scores.shape != (len(images),):
            raise RewardScoreError(
                f"reward {self.name!r} gave {scores.shape} scores for {len(images)} images"
            )
        bad = sorted(set(failures) | {int(i) for i in np.flatnonzero(~np.isfinite(scores))})
        if self.config.on_bad_score == "error":
            if bad:
                raise self._error(bad[0], scores, failures, prompts) from failures.get(bad[0])
            if batch_error is not None:
                # Each sample scores alone but the batch does not: no single prompt to blame.
                raise RewardScoreError(
                    f"reward {self.name!r} failed on a batch of {len(prompts)} prompts (first: "
                    f"{prompts[0]!r}) that each score alone: {batch_error}"
                ) from batch_error
        scores[bad] = np.nan
        for values in components.values():
            values[bad] = np.nan
        seconds = time.perf_counter() - start
        return ScoredChunk(scores, components, np.array(bad, dtype=np.int64), seconds)

    def _score_each(
        self, images: Sequence[ImageLike], prompts: Sequence[str], rows: list[Any]
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[int, Exception]]:
        """Scores [n] and components of the samples scored one at a time (NaN where one raised),
        and the exception of every sample that raised."""
        num_samples = len(images)
        scores = np.full(num_samples, np.nan)
        components: dict[str, np.ndarray] = {}
        failures: dict[int, Exception] = {}
        for i in range(num_samples):
            try:
                out = self.reward.score([images[i]], [prompts[i]], [rows[i]])
            except Exception as exc:  # handed to the bad-score policy by the caller
                failures[i] = exc
                continue
            scores[i] = out.scores[0]
            for key, values in out.components.items():
                components.setdefault(key, np.full(num_samples, np.nan))[i] = values[0]
        return scores, components, failures

    def _error(
        self, index: int, scores: np.ndarray, failures: dict[int, Exception], prompts: Sequence[str]
    ) -> RewardScoreError:
        if index in failures:
            what = f"raised {type(failures[index]).__name__}: {failures[index]}"
        else:
            what = f"gave the non-finite score {scores[index]}"
        return RewardScoreError(
            f"reward {self.name!r} {what} on prompt {prompts[index]!r} (image {index} of "
            f"{len(prompts)}); set rewards.{self.name}.on_bad_score: drop to drop such samples"
        )

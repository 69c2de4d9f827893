"""The reward protocol: images + prompts (+ metadata) -> one score per image and named components.

Scores are higher-is-better floats. A reward is built from keyword options (checkpoint paths,
device, batch size); `rewards.load(name, **options)` builds one by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

ImageLike = Image.Image | np.ndarray
"""A PIL image or a uint8 array [H, W, 3]."""


@dataclass(frozen=True)
class RewardOutput:
    """Per-image scores [N] and named per-image components (each [N])."""

    scores: np.ndarray
    components: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float64)
        if scores.ndim != 1:
            raise ValueError(f"RewardOutput.scores must be 1-D, got shape {scores.shape}")
        object.__setattr__(self, "scores", scores)
        components = {}
        for name, values in self.components.items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != scores.shape:
                raise ValueError(
                    f"RewardOutput.components[{name!r}] has shape {values.shape}, "
                    f"scores {scores.shape}"
                )
            components[name] = values
        object.__setattr__(self, "components", components)


@runtime_checkable
class Reward(Protocol):
    """What every reward provides."""

    name: str

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput: ...


class MissingCheckpointError(FileNotFoundError):
    """A reward's checkpoint file is not where its options say."""


def require_path(path: str | Path | None, *, reward: str, option: str, expected: str,
                 source: str) -> Path:  # fmt: skip
    """The checkpoint path of `option`, or an error naming it, its format and where it comes from."""
    if path is None:
        raise MissingCheckpointError(
            f"reward {reward!r}: option {option!r} is not set; expected {expected} ({source})"
        )
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingCheckpointError(
            f"reward {reward!r}: {option}={str(path)!r} does not exist; expected {expected} "
            f"({source}). No download happens at run time: fetch it once and pass its path."
        )
    return path


def check_batch(reward: str, images: Sequence[ImageLike], prompts: Sequence[str],
                metadata: Sequence[Mapping[str, Any] | None] | None) -> list[Mapping | None]:  # fmt: skip
    """Validate the lengths of a scoring call; returns metadata as a list (None where absent)."""
    if len(images) != len(prompts):
        raise ValueError(f"reward {reward!r}: {len(images)} images but {len(prompts)} prompts")
    if metadata is None:
        return [None] * len(images)
    if len(metadata) != len(images):
        raise ValueError(f"reward {reward!r}: {len(images)} images but {len(metadata)} metadata")
    return list(metadata)


def to_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image of a PIL image or a uint8 [H, W, 3] array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be PIL or uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def to_uint8(image: ImageLike) -> np.ndarray:
    """A uint8 [H, W, 3] RGB array of a PIL image or such an array."""
    return np.asarray(to_pil(image))


def check_batch_size(reward: str, batch_size: int) -> int:
    """`batch_size` if it is a positive count, else an error naming the reward."""
    if batch_size < 1:
        raise ValueError(f"reward {reward!r}: batch_size must be >= 1, got {batch_size}")
    return batch_size


def batched(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    """Consecutive chunks of at most `batch_size` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_with_options(
    name: str, factory: Callable[..., Reward], options: Mapping[str, Any]
) -> Reward:
    """Call `factory(**options)`, refusing an option it does not take by name."""
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = sorted(
            k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL
        )
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"reward {name!r}: unknown option(s) {unknown}; known: {known}")
    return factory(**options)


def score_batches(
    reward: str,
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    batch_size: int,
    score_fn: Callable[[list[Image.Image], list[str]], Any],
) -> np.ndarray:
    """`score_fn(rgb_images, prompts)` over batches -> float64 scores [N]; non-finite ones raise."""
    chunks = []
    for image_batch, prompt_batch in zip(batched(images, batch_size), batched(prompts, batch_size)):
        pil_images = [to_pil(image) for image in image_batch]
        chunks.append(np.asarray(score_fn(pil_images, list(prompt_batch)), dtype=np.float64))
    scores = np.concatenate([chunk.reshape(-1) for chunk in chunks]) if chunks else np.zeros(0)
    if scores.shape != (len(prompts),):
        raise ValueError(f"reward {reward!r}: {scores.shape[0]} scores for {len(prompts)} prompts")
    return require_finite(reward, scores, prompts)


def require_finite(reward: str, scores: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """`scores` unchanged, or an error naming the reward and the prompt of the first NaN/inf."""
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        index = int(bad[0])
        raise FloatingPointError(
            f"reward {reward!r}: score {scores[index]} for image {index} "
            f"(prompt {prompts[index]!r}); {bad.size} non-finite score(s) in the batch"
        )
    return scores

"""Reward models for Flow-GRPO and evaluation: one file per reward, one protocol, one registry.

import rewards
reward = rewards.load("ocr")
out = reward.score(images, prompts)   # out.scores [N], out.components {name: [N]}
"""

from __future__ import annotations

import importlib
from typing import Any

from rewards.base import MissingCheckpointError, Reward, RewardOutput, build_with_options

# name -> "module:factory"; modules are imported on first use, so a reward's heavy
# dependencies load only when that reward is asked for.
REGISTRY: dict[str, str] = {
    "pickscore": "rewards.pickscore:PickScore",
    "hpsv2": "rewards.hpsv2:HPSv2",
    "clipscore": "rewards.clipscore:CLIPScore",
    "aesthetic": "rewards.aesthetic:Aesthetic",
    "imagereward": "rewards.imagereward:ImageReward",
    "ocr": "rewards.ocr:OcrReward",
    "geneval": "rewards.geneval:GenEvalReward",
    "shapes_geneval": "rewards.shapes_geneval:ShapesGenEval",
    "jpeg_compressibility": "rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "rewards.jpeg:JpegIncompressibility",
    "multi": "rewards.multi:MultiReward",
}


def names() -> list[str]:
    """Every registered reward name."""
    return sorted(REGISTRY)


def load(name: str, **options: Any) -> Reward:
    """Build reward `name` from its options (checkpoint paths, device, batch size, ...)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known: {names()}")
    module_name, factory_name = REGISTRY[name].split(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    return build_with_options(name, factory, options)


__all__ = ["REGISTRY", "MissingCheckpointError", "Reward", "RewardOutput", "load", "names"]

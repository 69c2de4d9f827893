"""Model adapters: SD3 / SD3.5 behind the denoiser contract, presets, LoRA."""

from soar_ray.models.build import (
    build_model,
    load_pretrained,
    load_transformer,
    save_pretrained,
    save_transformer,
)
from soar_ray.models.lora import (
    LORA_TARGETS,
    adapters_disabled,
    add_lora,
    has_lora,
    merge_lora,
    trainable_parameters,
)
from soar_ray.models.presets import (
    COMPONENTS,
    PRESETS,
    TEXT_ENCODERS,
    SD3Preset,
    build_transformer,
    count_parameters,
    get_preset,
)
from soar_ray.models.sd3 import COND_KEYS, Cond, SD3Model

__all__ = [
    "COMPONENTS",
    "COND_KEYS",
    "LORA_TARGETS",
    "PRESETS",
    "TEXT_ENCODERS",
    "Cond",
    "SD3Model",
    "SD3Preset",
    "adapters_disabled",
    "add_lora",
    "build_model",
    "build_transformer",
    "count_parameters",
    "get_preset",
    "has_lora",
    "load_pretrained",
    "load_transformer",
    "merge_lora",
    "save_pretrained",
    "save_transformer",
    "trainable_parameters",
]

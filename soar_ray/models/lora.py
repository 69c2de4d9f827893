"""peft LoRA on the SD3 transformer (SPEC §3): add, list, disable for the reference, merge."""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

# Joint-attention projections of every MMDiT block (SPEC §3). The match is on the name suffix, so
# SD3.5-Medium's second self-attention (`attn2`) stays without LoRA, as in the Flow-GRPO reference.
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


# Config name -> peft `init_lora_weights`.
LORA_INITS = {"gaussian": "gaussian", "default": True}


def add_lora(
    transformer: SD3Transformer2DModel,
    rank: int = 32,
    alpha: float = 64.0,
    targets: Sequence[str] = LORA_TARGETS,
    seed: int = 0,
    init: str = "gaussian",
    dropout: float = 0.0,
) -> None:
    """Attach LoRA adapters and freeze the base weights; B = 0 at init keeps the output.

    init: `gaussian` (SPEC §3: A ~ N(0, 1/r)) or `default` (peft's Kaiming-uniform A).
    """
    if rank < 1 or alpha <= 0:
        raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
    if init not in LORA_INITS:
        raise ValueError(f"LoRA init must be one of {tuple(LORA_INITS)}, got {init!r}")
    if has_lora(transformer):
        raise ValueError("the transformer already carries LoRA adapters")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights=LORA_INITS[init], lora_dropout=dropout,
        target_modules=list(targets),
    )  # fmt: skip
    # peft draws A from the global RNG; a private stream from `seed` makes every rank identical.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)


def lora_layers(module: torch.nn.Module) -> list[BaseTunerLayer]:
    """Every peft-wrapped layer inside `module` (any wrapper around the transformer works)."""
    return [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


def has_lora(module: torch.nn.Module) -> bool:
    """Whether `module` contains peft adapter layers."""
    return bool(lora_layers(module))


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of everything that requires grad: the LoRA weights once LoRA is added."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


@contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` as its base model inside the block (SPEC §3 reference policy); restored on exit."""
    layers = lora_layers(module)
    if not layers:
        raise ValueError("adapters_disabled: the module has no LoRA adapters")
    was_disabled = [layer.disable_adapters for layer in layers]
    # peft flips requires_grad when toggling adapters; put back exactly what the caller had.
    requires_grad = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for param, flag in requires_grad:
            param.requires_grad_(flag)


def merge_lora(transformer: SD3Transformer2DModel) -> SD3Transformer2DModel:
    """In place: fold LoRA into the base (W += alpha / r * B A) and drop the adapters (export)."""
    # Training on needs the adapters: merge a copy.deepcopy of the transformer instead.
    if not has_lora(transformer):
        raise ValueError("merge_lora: the transformer has no LoRA adapters")
    transformer.fuse_lora()
    transformer.unload_lora()
    return transformer

"""Model presets (tiny | sd35-medium | sd35-large) and their seeded random-weight builders.

A preset holds the constructor arguments of every SD3 component. Random weights are drawn on the
CPU in fp32 from a per-component seed and only then moved and cast, so the same seed gives the same
weights in every process and on every device; `device="meta"` builds shapes only (parameter counts
of models that do not fit in memory).
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from soar_ray.models.sd3 import move

# Component names follow the subfolders of a diffusers SD3 checkpoint.
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class SD3Preset:
    """Constructor arguments of every component of one SD3 model shape."""

    name: str
    transformer: dict[str, Any]
    """SD3Transformer2DModel arguments."""
    vae: dict[str, Any]
    """AutoencoderKL arguments (SD3 VAE: 16 latent channels, shift and scaling factors)."""
    text_encoder: dict[str, Any]
    """CLIPTextConfig arguments of CLIP-L (CLIPTextModelWithProjection)."""
    text_encoder_2: dict[str, Any]
    """CLIPTextConfig arguments of CLIP-G (CLIPTextModelWithProjection)."""
    text_encoder_3: dict[str, Any]
    """T5Config arguments of the T5 encoder (T5EncoderModel)."""
    max_sequence_length: int
    """T5 tokens per prompt (the SOAR reference trains with 256)."""
    resolution: int
    """Default image side in pixels."""


def _sd3_vae(block_out_channels: tuple[int, ...], layers_per_block: int, num_groups: int) -> dict:
    """SD3 VAE arguments: no quant convs, 16 latent channels, SD3's latent shift and scale."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=16,
        norm_num_groups=num_groups,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip(hidden: int, num_layers: int, num_heads: int, act: str, pad_token_id: int) -> dict:
    """CLIPTextConfig arguments; pooling takes the first EOS token (id 49407)."""
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        projection_dim=hidden,
        hidden_act=act,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )


def _t5(vocab: int, d_model: int, d_ff: int, num_layers: int, num_heads: int, d_kv: int) -> dict:
    """T5Config arguments of a T5 v1.1 encoder (gated GELU, untied embeddings)."""
    return dict(
        vocab_size=vocab,
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
    )


# CLIP-L 32 + CLIP-G 48 = 80 wide, padded to T5's 96 as in SD3 (768 + 1280 = 2048 -> 4096).
TINY = SD3Preset(
    name="tiny",
    transformer=dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=80,
        out_channels=16,
        pos_embed_max_size=16,  # latents up to 32x32 (256 px) for resolution buckets
        dual_attention_layers=(0,),  # exercises SD3.5's MMDiT-X block
        qk_norm="rms_norm",
    ),
    vae=_sd3_vae((16, 16, 16, 16), layers_per_block=0, num_groups=1),
    text_encoder=_clip(32, num_layers=2, num_heads=2, act="quick_gelu", pad_token_id=49407),
    text_encoder_2=_clip(48, num_layers=2, num_heads=2, act="gelu", pad_token_id=0),
    text_encoder_3=_t5(384, d_model=96, d_ff=128, num_layers=2, num_heads=4, d_kv=16),
    max_sequence_length=77,
    resolution=64,
)

_SD35_VAE = _sd3_vae((128, 256, 512, 512), layers_per_block=2, num_groups=32)
_CLIP_L = _clip(768, num_layers=12, num_heads=12, act="quick_gelu", pad_token_id=49407)
_CLIP_G = _clip(1280, num_layers=32, num_heads=20, act="gelu", pad_token_id=0)
_T5_XXL = _t5(32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64)

SD35_MEDIUM = SD3Preset(
    name="sd35-medium",
    transformer=dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    vae=_SD35_VAE,
    text_encoder=_CLIP_L,
    text_encoder_2=_CLIP_G,
    text_encoder_3=_T5_XXL,
    max_sequence_length=256,
    resolution=512,
)

SD35_LARGE = SD3Preset(
    name="sd35-large",
    transformer=dict(
        SD35_MEDIUM.transformer,
        num_layers=38,
        num_attention_heads=38,
        caption_projection_dim=2432,
        pos_embed_max_size=192,
        dual_attention_layers=(),
    ),
    vae=_SD35_VAE,
    text_encoder=_CLIP_L,
    text_encoder_2=_CLIP_G,
    text_encoder_3=_T5_XXL,
    max_sequence_length=256,
    resolution=512,
)

PRESETS: dict[str, SD3Preset] = {p.name: p for p in (TINY, SD35_MEDIUM, SD35_LARGE)}


def get_preset(name: str) -> SD3Preset:
    """Look a preset up by name; unknown names raise with the list of known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def check_components(components: Sequence[str]) -> tuple[str, ...]:
    """Validate component names and return them in canonical order."""
    if isinstance(components, str):
        raise ValueError(f"components must be a sequence of names, got the string {components!r}")
    unknown = set(components) - set(COMPONENTS)
    if unknown or not components:
        raise ValueError(f"components must be a non-empty subset of {COMPONENTS}, got {components}")
    return tuple(name for name in COMPONENTS if name in components)


@contextmanager
def _init_context(seed: int, device: torch.device) -> Iterator[None]:
    """Shape-only construction on meta, else seeded CPU construction; the global RNG is kept."""
    if device.type == "meta":
        with torch.device("meta"):
            yield
        return
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        yield


def build_component(
    preset: SD3Preset | str,
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> torch.nn.Module:
    """One component with random weights drawn from `seed` (independent of the other components)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    (name,) = check_components([name])
    device = torch.device(device)
    # Each component draws from its own stream, so building a subset gives the same weights.
    component_seed = seed * len(COMPONENTS) + COMPONENTS.index(name)
    with _init_context(component_seed, device):
        if name == "transformer":
            module = SD3Transformer2DModel(**preset.transformer)
        elif name == "vae":
            module = AutoencoderKL(**preset.vae)
        elif name == "text_encoder_3":
            module = T5EncoderModel(T5Config(**preset.text_encoder_3))
        else:
            module = CLIPTextModelWithProjection(CLIPTextConfig(**getattr(preset, name)))
    move(module, device, dtype)
    return module


def build_transformer(
    preset: SD3Preset | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> SD3Transformer2DModel:
    """The preset's MMDiT with random weights (same seed, same weights as in `build_model`)."""
    return build_component(preset, "transformer", device=device, dtype=dtype, seed=seed)


def count_parameters(preset: SD3Preset | str) -> dict[str, int]:
    """Parameters per component and in total, counted on the meta device (no memory used)."""
    counts = {
        name: sum(p.numel() for p in build_component(preset, name, device="meta").parameters())
        for name in COMPONENTS
    }
    counts["total"] = sum(counts.values())
    return counts

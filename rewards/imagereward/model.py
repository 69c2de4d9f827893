"""ImageReward's network (Xu et al. 2023): BLIP ViT image encoder, BERT text encoder that
cross-attends to the image tokens, and the LAION MLP head on the [CLS] feature.

Module names mirror BLIP's `med.py` / `vit.py` and ImageReward's `ImageReward` class, so the
state dict of `ImageReward.pt` (keys `blip.visual_encoder.*`, `blip.text_encoder.*`,
`blip.vision_proj.*`, `blip.text_proj.*`, `mlp.layers.*`) loads with strict=True. The ViT is
timm's VisionTransformer, whose parameter names BLIP's ViT copies.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from rewards.aesthetic import LaionMLP

BLIP_EMBED_DIM = 256  # width of BLIP's contrastive projections (kept only so the file loads)


@dataclass(frozen=True)
class VisionConfig:
    """BLIP's ViT; the defaults are ViT-L/16 at 224 px, the encoder ImageReward ships with."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16


@dataclass(frozen=True)
class TextConfig:
    """The BERT fields ImageReward reads from BLIP's med_config.json."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float

    @classmethod
    def from_med_config(cls, path: Path) -> TextConfig:
        """Parse med_config.json: a BertConfig with add_cross_attention and GELU activations."""
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: med_config is not valid JSON ({err})") from err
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in config]
        if missing:
            raise ValueError(f"{path}: med_config is missing field(s) {missing}")
        if config.get("add_cross_attention") is not True:
            raise ValueError(f"{path}: med_config must set add_cross_attention: true")
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {config['hidden_act']!r} (only 'gelu' is used)")
        return cls(**{name: config[name] for name in names})


def build_vit(config: VisionConfig) -> VisionTransformer:
    """BLIP's ViT: pre-norm blocks, qkv bias, LayerNorm eps 1e-6, no pooling and no head."""
    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


class _MultiHeadAttention(nn.Module):
    """BERT attention scores; key/value take `context_width` inputs (the ViT width for cross)."""

    def __init__(self, hidden_size: int, context_width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(context_width, hidden_size)
        self.value = nn.Linear(context_width, hidden_size)

    def forward(
        self, x_BLD: torch.Tensor, context_BSE: torch.Tensor, mask_B11S: torch.Tensor | None
    ) -> torch.Tensor:
        batch, length, width = x_BLD.shape

        def split_heads(t_BSD: torch.Tensor) -> torch.Tensor:
            return t_BSD.view(batch, -1, self.num_heads, width // self.num_heads).transpose(1, 2)

        q, k, v = self.query(x_BLD), self.key(context_BSE), self.value(context_BSE)
        out = F.scaled_dot_product_attention(
            split_heads(q), split_heads(k), split_heads(v), attn_mask=mask_B11S
        )
        return out.transpose(1, 2).reshape(batch, length, width)


class _DenseAddNorm(nn.Module):
    """LayerNorm(dense(x) + residual): BERT's SelfOutput and Output."""

    def __init__(self, in_width: int, out_width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, out_width)
        self.LayerNorm = nn.LayerNorm(out_width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    """Attention block; the submodule is named `self` because the checkpoint keys say so."""

    def __init__(self, config: TextConfig, context_width: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.self = _MultiHeadAttention(hidden, context_width, config.num_attention_heads)
        self.output = _DenseAddNorm(hidden, hidden, config.layer_norm_eps)

    def forward(
        self, x_BLD: torch.Tensor, context_BSE: torch.Tensor, mask_B11S: torch.Tensor | None
    ) -> torch.Tensor:
        return self.output(self.self(x_BLD, context_BSE, mask_B11S), x_BLD)


class _Intermediate(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    """Self-attention over the prompt, cross-attention to the image tokens, feed-forward."""

    def __init__(self, config: TextConfig, image_width: int) -> None:
        super().__init__()
        self.attention = _Attention(config, config.hidden_size)
        self.crossattention = _Attention(config, image_width)
        self.intermediate = _Intermediate(config)
        self.output = _DenseAddNorm(
            config.intermediate_size, config.hidden_size, config.layer_norm_eps
        )

    def forward(
        self, x_BLD: torch.Tensor, text_mask_B11L: torch.Tensor, image_BSE: torch.Tensor
    ) -> torch.Tensor:
        x_BLD = self.attention(x_BLD, x_BLD, text_mask_B11L)
        # Every image token is valid: BLIP's all-ones image mask adds nothing to the scores.
        x_BLD = self.crossattention(x_BLD, image_BSE, None)
        return self.output(self.intermediate(x_BLD), x_BLD)


class _Embeddings(nn.Module):
    """Word + absolute position embeddings (BLIP's BERT has no token-type embeddings)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids_BL: torch.Tensor) -> torch.Tensor:
        positions_L = torch.arange(input_ids_BL.shape[1], device=input_ids_BL.device)
        embeddings = self.word_embeddings(input_ids_BL) + self.position_embeddings(positions_L)
        return self.LayerNorm(embeddings)


class _Encoder(nn.Module):
    def __init__(self, config: TextConfig, image_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            _Layer(config, image_width) for _ in range(config.num_hidden_layers)
        )


class TextEncoder(nn.Module):
    """BLIP's BERT in "multimodal" mode: hidden states [B, L, D] of the prompt given the image."""

    def __init__(self, config: TextConfig, image_width: int) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config, image_width)

    def forward(
        self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, image_BSE: torch.Tensor
    ) -> torch.Tensor:
        x_BLD = self.embeddings(input_ids_BL)
        # BLIP's additive padding mask: 0 where attended, -10000 at padding.
        keep_B11L = attention_mask_BL[:, None, None, :].to(x_BLD.dtype)
        mask_B11L = (1.0 - keep_B11L) * -10000.0
        for layer in self.encoder.layer:
            x_BLD = layer(x_BLD, mask_B11L, image_BSE)
        return x_BLD


class Blip(nn.Module):
    """The BLIP towers ImageReward keeps (the contrastive projections load but go unused)."""

    def __init__(self, vision: VisionConfig, text: TextConfig) -> None:
        super().__init__()
        self.visual_encoder = build_vit(vision)
        self.text_encoder = TextEncoder(text, image_width=vision.width)
        self.vision_proj = nn.Linear(vision.width, BLIP_EMBED_DIM)
        self.text_proj = nn.Linear(text.hidden_size, BLIP_EMBED_DIM)


class ImageRewardNet(nn.Module):
    """Raw ImageReward: MLP of the [CLS] hidden state of the prompt cross-attending the image."""

    def __init__(self, vision: VisionConfig, text: TextConfig) -> None:
        super().__init__()
        self.blip = Blip(vision, text)
        self.mlp = LaionMLP(text.hidden_size)

    def cls_feature(
        self, pixels_BCHW: torch.Tensor, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor
    ) -> torch.Tensor:
        """The [CLS] hidden state [B, D] that the head scores."""
        image_BSE = self.blip.visual_encoder.forward_features(pixels_BCHW)
        hidden_BLD = self.blip.text_encoder(input_ids_BL, attention_mask_BL, image_BSE)
        return hidden_BLD[:, 0, :]

    def forward(
        self, pixels_BCHW: torch.Tensor, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor
    ) -> torch.Tensor:
        """Unnormalised reward [B]."""
        return self.mlp(self.cls_feature(pixels_BCHW, input_ids_BL, attention_mask_BL))


def vision_config(overrides: Mapping[str, int] | None) -> VisionConfig:
    """VisionConfig with `overrides` applied; unknown fields raise."""
    overrides = dict(overrides or {})
    known = [field.name for field in dataclasses.fields(VisionConfig)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"reward 'imagereward': unknown vision field(s) {unknown}; known: {known}")
    return VisionConfig(**overrides)

"""The shapes study's model: an SD3 autoencoder trained on the world's training images, the tiny
preset's frozen random text encoders, and a small MMDiT denoiser from scratch, saved as one
diffusers SD3 folder that any job loads with `model.pretrained`.

The autoencoder is the one part trained outside soar_ray (the framework post-trains denoisers, it
does not train VAEs): AutoencoderKL with SD3's 16 latent channels, MSE plus a small KL, then SD3's
latent shift and scale set from the training latents so they have mean 0 and std 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from tqdm import tqdm

from soar_ray.models import SD3Model, save_pretrained
from soar_ray.models.presets import TEXT_ENCODERS, TINY, _sd3_vae, build_component
from soar_ray.models.sd3 import move
from soar_ray.models.tokenizers import clip_g_tokenizer, clip_l_tokenizer, t5_tokenizer

TOKENIZERS = {"tokenizer": clip_l_tokenizer, "tokenizer_2": clip_g_tokenizer,
              "tokenizer_3": t5_tokenizer}  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    """Sizes of the study's autoencoder and denoiser."""

    vae_channels: tuple[int, ...] = (32, 64, 64)
    """AutoencoderKL block widths: len - 1 halvings (4x: 32 px images, 8 x 8 latents)."""
    num_layers: int = 6
    """MMDiT blocks."""
    num_heads: int = 4
    head_dim: int = 32
    patch_size: int = 1


def autoencoder(shape: ModelShape) -> AutoencoderKL:
    return AutoencoderKL(**_sd3_vae(shape.vae_channels, layers_per_block=1, num_groups=8))


def denoiser(shape: ModelShape, latent_size: int) -> SD3Transformer2DModel:
    """An SD3 MMDiT sized by `shape`, fed by the tiny preset's text encoders."""
    text = TINY.transformer
    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=shape.patch_size, in_channels=16, out_channels=16,
        num_layers=shape.num_layers, attention_head_dim=shape.head_dim,
        num_attention_heads=shape.num_heads, joint_attention_dim=text["joint_attention_dim"],
        caption_projection_dim=shape.num_heads * shape.head_dim,
        pooled_projection_dim=text["pooled_projection_dim"],
        pos_embed_max_size=latent_size // shape.patch_size, qk_norm="rms_norm",
    )  # fmt: skip


def to_pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_autoencoder(
    images: np.ndarray,
    shape: ModelShape,
    *,
    steps: int,
    batch_size: int,
    device: torch.device,
    seed: int,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
) -> tuple[AutoencoderKL, list[float]]:
    """Fit the autoencoder to `images` (uint8 [N, H, W, 3]); returns it and the loss curve.
    Then sets SD3's shift and scaling factor so the training latents have mean 0 and std 1."""
    torch.manual_seed(seed)
    vae = autoencoder(shape).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    generator = np.random.default_rng(seed)
    pool = torch.from_numpy(images).to(device)  # the whole set on the device: no per-step copy
    losses = []
    for _ in tqdm(range(steps), desc="autoencoder", unit="step", mininterval=5):
        index = torch.from_numpy(generator.integers(0, len(images), batch_size)).to(device)
        x = pool[index].permute(0, 3, 1, 2).float() / 127.5 - 1
        # bf16 on GPU: the loss is an MSE of a small model, far above bf16's resolution.
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon.float(), x) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    losses = torch.stack(losses).tolist()  # one host sync, after training
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_pixels(images[i : i + 256], device)).latent_dist.mean
                             for i in range(0, len(images), 256)])  # fmt: skip
    shift, std = latents.mean().item(), latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    return vae.cpu(), losses


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    """uint8 images through encode (posterior mean) and decode, as generated images are."""
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), 256):
        z = vae.encode(to_pixels(images[i : i + 256], device)).latent_dist.mean
        x = vae.decode(z).sample.clamp(-1, 1)
        out.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def save_study_model(vae: AutoencoderKL, shape: ModelShape, latent_size: int, seed: int,
                     folder: Path) -> Path:  # fmt: skip
    """The diffusers SD3 folder: trained autoencoder, seeded random text encoders (the tiny
    preset's) and a seeded random denoiser, all fp32."""
    parts: dict[str, torch.nn.Module | object] = {"vae": vae}
    for name in TEXT_ENCODERS:
        parts[name] = build_component(TINY, name, seed=seed)
    parts |= {name: make() for name, make in TOKENIZERS.items()}
    torch.manual_seed(seed)
    parts["transformer"] = denoiser(shape, latent_size)
    move(parts["transformer"], "cpu", torch.float32)
    model = SD3Model(parts, latent_channels=16, vae_scale_factor=2 ** (len(shape.vae_channels) - 1),
                     max_sequence_length=TINY.max_sequence_length)  # fmt: skip
    return save_pretrained(model, folder)

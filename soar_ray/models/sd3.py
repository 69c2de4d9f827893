"""SD3 / SD3.5 adapter: MMDiT denoiser, VAE and CLIP-L/CLIP-G/T5 text encoders behind one contract.

`SD3Model.denoise(x_BCHW, timestep_B, cond) -> v_BCHW` is the shared denoiser contract (timestep =
sigma * 1000, velocity z1 - z0); prompts and images are encoded by separate methods so a latent
cache can skip them. Encoders and VAE are frozen; only the transformer is ever trained.
"""

import os
import shutil

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import PreTrainedTokenizerBase

Cond = dict[str, torch.Tensor]
# SD3 and SD3.5 (Medium and Large) train and sample on FlowMatchEulerDiscreteScheduler(shift=3.0).
SD3_SCHEDULE_SHIFT = 3.0
COND_KEYS = ("prompt_embeds", "pooled_embeds")  # [B, L, D] and [B, P]
_PARTS = (
    "transformer",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
)


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    """dtype of a module's first parameter (works for wrapped modules, e.g. a DeepSpeed engine)."""
    return next(module.parameters()).dtype


def move(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None) -> None:
    """Move/cast in place via nn.Module.to: diffusers' own `to` warns on every dtype cast."""
    torch.nn.Module.to(module, device=device, dtype=dtype)


def set_activation_checkpointing(transformer: SD3Transformer2DModel, blocks: bool | int) -> int:
    """Recompute MMDiT block activations in backward instead of keeping them: every block (True),
    none (False) or the first `blocks` (selective: the others keep their activations, trading
    memory for the recomputed forward). Returns how many blocks recompute."""
    count = len(transformer.transformer_blocks)
    chosen = count if blocks is True else min(int(blocks), count)
    for index, block in enumerate(transformer.transformer_blocks):
        block.soar_recompute = index < chosen
    if chosen:
        transformer.enable_gradient_checkpointing(_recompute_marked)
    else:
        transformer.disable_gradient_checkpointing()
    return chosen


def _recompute_marked(block: torch.nn.Module, *args):
    """diffusers' checkpointing hook, called for every block: checkpoint the marked ones."""
    if block.soar_recompute:
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
    return block(*args)


COMPILERS = {
    # What torch.compile builds its kernels with on first use: Triton's launcher on GPUs (a C
    # compiler, $CC first), inductor's C++ kernels on the CPU ($CXX first).
    "cuda": ("CC", ("cc", "gcc", "clang"), "C compiler (e.g. apt-get install gcc)"),
    "cpu": ("CXX", ("g++", "clang++", "c++"), "C++ compiler (e.g. apt-get install g++)"),
}


VARIANTS_PER_BLOCK_KIND = 32
"""Compiled variants allowed per MMDiT block kind: 2 grad modes x 2 train/eval x 2 adapter states x
2 shape modes, twice over for what else a guard may split on."""


def compile_blocks(transformer: SD3Transformer2DModel, field: str) -> None:
    """torch.compile every MMDiT block in place (`nn.Module.compile`: the state-dict names stay;
    a deep copy, e.g. a stage's reference policy, runs eagerly with its own weights). `field`,
    the setting that asks for it, is named in the one-line error of a node without a compiler."""
    device = next(transformer.parameters()).device.type
    variable, names, what = COMPILERS.get(device, COMPILERS["cuda"])
    if not os.environ.get(variable) and not any(shutil.which(name) for name in names):
        raise RuntimeError(
            f"{field}: torch.compile needs a {what} on this node to build its kernels, and "
            f"finds none (${variable}, {', '.join(names)} on PATH); install one or set "
            f"{field}: false"
        )
    # Dynamo keeps at most `recompile_limit` compiled variants of a code object, and every block
    # of a kind shares one (JointTransformerBlock.forward): a variant per block kind (dual
    # attention, plain, last) x grad mode x train/eval x LoRA adapters on/off x static/dynamic
    # shapes (a second latent bucket makes the sizes dynamic). Past the limit dynamo would run the
    # block eagerly, with a log line alone; here the limit covers those variants, and one past it
    # stops with dynamo's error rather than leaving a run slow without a word.
    kinds = {(block.use_dual_attention, block.context_pre_only)
             for block in transformer.transformer_blocks}  # fmt: skip
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, VARIANTS_PER_BLOCK_KIND * len(kinds))
    config.fail_on_recompile_limit_hit = True
    for block in transformer.transformer_blocks:
        block.compile()


def check_cond(cond: Cond, batch_size: int) -> None:
    """Raise unless `cond` has exactly the SD3 keys with batch-first tensors of `batch_size`."""
    if set(cond) != set(COND_KEYS):
        raise ValueError(f"cond must have keys {COND_KEYS}, got {sorted(cond)}")
    for key, ndim in zip(COND_KEYS, (3, 2)):
        if cond[key].ndim != ndim or cond[key].shape[0] != batch_size:
            raise ValueError(
                f"cond[{key!r}] must be {ndim}-d of batch {batch_size}: {tuple(cond[key].shape)}"
            )


def sd3_denoise(
    transformer: SD3Transformer2DModel, x_BCHW: torch.Tensor, timestep_B: torch.Tensor, cond: Cond
) -> torch.Tensor:
    """The denoiser contract over an SD3 transformer: velocity z1 - z0 at timestep = sigma * 1000,
    in the dtype of `x_BCHW`."""
    batch_size = x_BCHW.shape[0]
    if x_BCHW.ndim != 4 or timestep_B.shape != (batch_size,):
        raise ValueError(
            f"expected x [B, C, H, W] and timestep [B], got {tuple(x_BCHW.shape)} and "
            f"{tuple(timestep_B.shape)}"
        )
    check_cond(cond, batch_size)
    # The transformer runs in its own dtype (bf16 in training); the caller's math stays in its.
    dtype = param_dtype(transformer)
    v_BCHW = transformer(
        hidden_states=x_BCHW.to(dtype),
        encoder_hidden_states=cond["prompt_embeds"].to(dtype),
        pooled_projections=cond["pooled_embeds"].to(dtype),
        timestep=timestep_B,
        return_dict=False,
    )[0]
    return v_BCHW.to(x_BCHW.dtype)


class SD3Model:
    """Any subset of the SD3 components under their diffusers names; see the module docstring."""

    def __init__(
        self,
        parts: dict[str, torch.nn.Module | PreTrainedTokenizerBase],
        latent_channels: int,
        vae_scale_factor: int,
        max_sequence_length: int,
    ) -> None:
        unknown = set(parts) - set(_PARTS)
        if unknown:
            raise ValueError(f"unknown SD3 parts {sorted(unknown)}; known: {_PARTS}")
        text_parts = [name for name in _PARTS[2:] if name in parts]
        if text_parts and len(text_parts) != 6:
            raise ValueError(f"text encoding needs all 3 encoders and tokenizers, got {text_parts}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.transformer: SD3Transformer2DModel | None = parts.get("transformer")
        self.vae: AutoencoderKL | None = parts.get("vae")
        self.text_encoder = parts.get("text_encoder")
        self.tokenizer = parts.get("tokenizer")
        self.text_encoder_2 = parts.get("text_encoder_2")
        self.tokenizer_2 = parts.get("tokenizer_2")
        self.text_encoder_3 = parts.get("text_encoder_3")
        self.tokenizer_3 = parts.get("tokenizer_3")
        self.max_sequence_length = max_sequence_length
        self._latent_channels = latent_channels
        self._vae_scale_factor = vae_scale_factor
        self._uncond: Cond | None = None
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent space (16 for SD3)."""
        return self._latent_channels

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD3)."""
        return self._vae_scale_factor

    @property
    def parts(self) -> dict[str, torch.nn.Module | PreTrainedTokenizerBase]:
        """The components this model holds, by diffusers subfolder name."""
        held = {name: getattr(self, name) for name in _PARTS}
        return {name: part for name, part in held.items() if part is not None}

    def frozen_modules(self) -> list[torch.nn.Module]:
        """VAE and text encoders present (never trained)."""
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return [getattr(self, n) for n in names if getattr(self, n) is not None]

    def _require(self, name: str) -> torch.nn.Module:
        part = getattr(self, name)
        if part is None:
            raise ValueError(f"this SD3Model was built without {name}; add it to `components`")
        return part

    def place(
        self,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        encoder_dtype: torch.dtype | None = None,
    ) -> "SD3Model":
        """Transformer to (device, dtype); VAE and text encoders to (device, encoder_dtype)."""
        if self.transformer is not None:
            move(self.transformer, device, dtype)
        for module in self.frozen_modules():
            move(module, device, encoder_dtype)
        self._uncond = None  # re-encode on the new device / dtype
        return self

    def denoise(self, x_BCHW: torch.Tensor, timestep_B: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity z1 - z0 at timestep = sigma * 1000, returned in the dtype of `x_BCHW`."""
        return sd3_denoise(self._require("transformer"), x_BCHW, timestep_B, cond)

    __call__ = denoise

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Embeddings exactly as StableDiffusion3Pipeline.encode_prompt (one image per prompt)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r}")
        clip_l_BLD, pooled_l_BP = self._clip_embeds(self.text_encoder, self.tokenizer, prompts)
        clip_g_BLD, pooled_g_BP = self._clip_embeds(self.text_encoder_2, self.tokenizer_2, prompts)
        t5_BLD = self._t5_embeds(prompts)
        # CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5 after them in sequence.
        clip_BLD = torch.cat([clip_l_BLD, clip_g_BLD], dim=-1)
        clip_BLD = F.pad(clip_BLD, (0, t5_BLD.shape[-1] - clip_BLD.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip_BLD, t5_BLD], dim=-2),
            "pooled_embeds": torch.cat([pooled_l_BP, pooled_g_BP], dim=-1),
        }

    def _clip_embeds(
        self,
        encoder: torch.nn.Module | None,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[str],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate hidden states and projected pooled output of one CLIP (77 tokens)."""
        if encoder is None:
            raise ValueError(
                "this SD3Model was built without text encoders; add them to components"
            )
        input_ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,  # the pipeline uses CLIP-L's for both
            truncation=True,
            return_tensors="pt",
        ).input_ids
        output = encoder(input_ids.to(encoder.device), output_hidden_states=True)
        return output.hidden_states[-2], output.text_embeds

    def _t5_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Last hidden states of T5 over `max_sequence_length` tokens (no attention mask: SD3)."""
        input_ids = self.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder_3(input_ids.to(self.text_encoder_3.device))[0]

    def uncond(self, batch_size: int) -> Cond:
        """Encoding of the empty prompt for CFG, computed once and repeated `batch_size` times."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return {
            key: value.repeat(batch_size, *[1] * (value.ndim - 1))
            for key, value in self._uncond.items()
        }

    @torch.no_grad()
    def encode_images(
        self, pixels_BCHW: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """SD3 latents (z - shift) * scale of pixels in [-1, 1]; posterior sample if `generator`."""
        # Default is the posterior mean: a latent cache built twice is bitwise the same.
        vae = self._require("vae")
        shape, factor = tuple(pixels_BCHW.shape), self.vae_scale_factor
        if len(shape) != 4 or shape[1] != 3 or shape[2] % factor or shape[3] % factor:
            raise ValueError(
                f"pixels must be [B, 3, H, W] with H, W multiples of {factor}, got {shape}"
            )
        posterior = vae.encode(pixels_BCHW.to(vae.device, param_dtype(vae))).latent_dist
        z_BCHW = posterior.mean if generator is None else posterior.sample(generator)
        return (z_BCHW - vae.config.shift_factor) * vae.config.scaling_factor  # in the VAE's dtype

    @torch.no_grad()
    def decode_latents(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (clamped) of SD3 latents, in the VAE's dtype."""
        vae = self._require("vae")
        if latents_BCHW.ndim != 4 or latents_BCHW.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be [B, {self.latent_channels}, h, w]: {tuple(latents_BCHW.shape)}"
            )
        z_BCHW = latents_BCHW.to(vae.device, param_dtype(vae))
        z_BCHW = z_BCHW / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z_BCHW, return_dict=False)[0].clamp(-1.0, 1.0)


def vae_scale_factor(block_out_channels: list[int] | tuple[int, ...]) -> int:
    """Downsampling of an AutoencoderKL: one factor 2 between consecutive blocks."""
    return 2 ** (len(block_out_channels) - 1)

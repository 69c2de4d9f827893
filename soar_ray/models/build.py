"""Build an SD3Model from a preset (seeded random weights) or a diffusers folder; save as one.

A diffusers SD3 folder (e.g. stabilityai/stable-diffusion-3.5-medium) has one subfolder per part:
transformer, vae, text_encoder (CLIP-L), text_encoder_2 (CLIP-G), text_encoder_3 (T5) and the three
tokenizers. `save_pretrained` writes exactly that layout (through StableDiffusion3Pipeline), so the
tiny preset exercises the same loader as real weights.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from soar_ray.models.lora import has_lora
from soar_ray.models.presets import COMPONENTS, build_component, check_components, get_preset
from soar_ray.models.sd3 import SD3Model, move, vae_scale_factor
from soar_ray.models.tokenizers import clip_g_tokenizer, clip_l_tokenizer, t5_tokenizer

HF_REPO = "stabilityai/stable-diffusion-3.5-medium"
PRETRAINED_MAX_SEQUENCE_LENGTH = 256  # T5 tokens in the SOAR reference training
_TOKENIZERS: dict[str, tuple[str, Callable]] = {
    "text_encoder": ("tokenizer", clip_l_tokenizer),
    "text_encoder_2": ("tokenizer_2", clip_g_tokenizer),
    "text_encoder_3": ("tokenizer_3", t5_tokenizer),
}
_LOADERS: dict[str, Callable] = {
    "text_encoder": CLIPTextModelWithProjection.from_pretrained,
    "text_encoder_2": CLIPTextModelWithProjection.from_pretrained,
    "text_encoder_3": T5EncoderModel.from_pretrained,
}


def build_model(
    preset: str | None = None,
    pretrained: str | Path | None = None,
    components: Sequence[str] = COMPONENTS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    encoder_dtype: torch.dtype | None = None,
    seed: int = 0,
    max_sequence_length: int | None = None,
    transformer: str | Path | None = None,
) -> SD3Model:
    """SD3Model from a `preset` (random weights from `seed`) or a `pretrained` diffusers folder;
    `transformer`, a diffusers transformer folder, replaces the transformer of either."""
    # dtype is the transformer's (training) dtype; encoder_dtype (default: dtype) is the VAE's and
    # the text encoders'. device="meta" builds preset shapes only, for parameter counting.
    if (preset is None) == (pretrained is None):
        raise ValueError(
            "give exactly one of preset= (tiny | sd35-medium | sd35-large) or pretrained="
        )
    components = check_components(components)
    encoder_dtype = dtype if encoder_dtype is None else encoder_dtype
    if pretrained is not None:
        if torch.device(device).type == "meta":
            raise ValueError("pretrained models load real weights; use a preset for device='meta'")
        model = load_pretrained(pretrained, components, dtype, encoder_dtype, max_sequence_length,
                                transformer=transformer)  # fmt: skip
        return model.place(device)
    spec = get_preset(preset)
    parts = {}
    for name in components:
        part_dtype = dtype if name == "transformer" else encoder_dtype
        if name == "transformer" and transformer is not None:
            parts[name] = load_transformer(transformer, device, part_dtype)
            continue
        parts[name] = build_component(spec, name, device=device, dtype=part_dtype, seed=seed)
        if name in _TOKENIZERS:
            tokenizer_name, make_tokenizer = _TOKENIZERS[name]
            parts[tokenizer_name] = make_tokenizer()
    return SD3Model(
        parts,
        latent_channels=spec.vae["latent_channels"],
        vae_scale_factor=vae_scale_factor(spec.vae["block_out_channels"]),
        max_sequence_length=max_sequence_length or spec.max_sequence_length,
    )


def _check_folder(root: Path, subfolders: Sequence[str]) -> None:
    """Raise FileNotFoundError naming the missing folder and how to get the checkpoint."""
    hint = (
        f"download the diffusers checkpoint (e.g. `huggingface-cli download {HF_REPO} "
        f"--local-dir {root}` after accepting its license on the Hub) and pass that folder"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"pretrained model folder {root} does not exist; {hint}")
    for subfolder in subfolders:
        if not (root / subfolder).is_dir():
            raise FileNotFoundError(
                f"pretrained model folder {root} has no {subfolder}/ subfolder; a diffusers SD3 "
                f"checkpoint has transformer, vae, text_encoder(_2, _3), tokenizer(_2, _3); {hint}"
            )


def load_pretrained(
    path: str | Path,
    components: Sequence[str] = COMPONENTS,
    dtype: torch.dtype = torch.float32,
    encoder_dtype: torch.dtype | None = None,
    max_sequence_length: int | None = None,
    transformer: str | Path | None = None,
) -> SD3Model:
    """SD3Model on the CPU from a diffusers SD3 folder, loading only `components` (the
    transformer from `transformer` when given)."""
    root = Path(path).expanduser()
    components = check_components(components)
    encoder_dtype = dtype if encoder_dtype is None else encoder_dtype
    tokenizers = [_TOKENIZERS[name][0] for name in components if name in _TOKENIZERS]
    # The VAE config defines the latent space, so it is read even when the VAE is not loaded.
    replaced = {"transformer"} if transformer is not None else set()
    _check_folder(root, sorted({"vae", *components, *tokenizers} - replaced))
    parts = {}
    for name in components:
        folder = str(root / name)
        if name == "transformer":
            parts[name] = load_transformer(transformer or folder, "cpu", dtype)
        elif name == "vae":
            parts[name] = AutoencoderKL.from_pretrained(folder, torch_dtype=encoder_dtype)
        else:
            parts[name] = _LOADERS[name](folder, dtype=encoder_dtype)
    for name in tokenizers:
        parts[name] = AutoTokenizer.from_pretrained(str(root / name))
    vae_config = AutoencoderKL.load_config(str(root / "vae"))
    return SD3Model(
        parts,
        latent_channels=vae_config["latent_channels"],
        vae_scale_factor=vae_scale_factor(vae_config["block_out_channels"]),
        max_sequence_length=max_sequence_length or PRETRAINED_MAX_SEQUENCE_LENGTH,
    )


def save_pretrained(model: SD3Model, path: str | Path) -> Path:
    """Write a complete model as a diffusers SD3 folder (loadable by `build_model(pretrained=)`)."""
    missing = set(COMPONENTS) - set(model.parts)
    if missing:
        raise ValueError(
            f"save_pretrained needs every component; this model lacks {sorted(missing)}"
        )
    if has_lora(model.transformer):
        raise ValueError(
            "the transformer carries LoRA adapters; merge them first (lora.merge_lora)"
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(scheduler=scheduler, **model.parts)
    pipeline.save_pretrained(str(path))
    return Path(path)


def save_transformer(transformer: SD3Transformer2DModel, path: str | Path) -> Path:
    """Write the transformer as a folder that SD3Transformer2DModel.from_pretrained loads."""
    if has_lora(transformer):
        raise ValueError(
            "the transformer carries LoRA adapters; merge them first (lora.merge_lora)"
        )
    transformer.save_pretrained(str(path))
    return Path(path)


def load_transformer(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> SD3Transformer2DModel:
    """A transformer saved by `save_transformer` (or a checkpoint's transformer/ subfolder)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved SD3 transformer (no config.json in it)")
    transformer = SD3Transformer2DModel.from_pretrained(str(folder), torch_dtype=dtype)
    move(transformer, device, None)
    return transformer

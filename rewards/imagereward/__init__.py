"""ImageReward (Xu et al. 2023): a BLIP-based human-preference reward for text-to-image.

Score = (MLP(h_CLS) - mean) / std, where h_CLS is the [CLS] hidden state of the prompt (BERT
tokens, padded to 35) cross-attending the BLIP ViT-L image tokens, and mean/std are the released
normalisation constants, as ImageReward's `score` / `inference_rank` compute it.
Files: `ImageReward.pt` (state dict), BLIP's `med_config.json` (both from THUDM/ImageReward) and a
bert-base-uncased tokenizer folder (vocab.txt), which ImageReward extends with "[DEC]" / "[ENC]".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from transformers import BertTokenizer

from rewards.base import (
    ImageLike,
    RewardOutput,
    check_batch,
    check_batch_size,
    require_path,
    resolve_device,
    score_batches,
)
from rewards.clip_common import require_folder
from rewards.imagereward.model import ImageRewardNet, TextConfig, vision_config

REWARD_MEAN = 0.16717362830052426  # ImageReward's released normalisation of the raw MLP output
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35  # ImageReward pads / truncates every prompt to 35 BERT tokens
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # ImageReward preprocesses like OpenAI CLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# BLIP's med.py keeps an arange buffer here; it holds no weights and positions are recomputed.
POSITION_IDS_KEY = "blip.text_encoder.embeddings.position_ids"

SOURCE = "https://huggingface.co/THUDM/ImageReward"
CHECKPOINT_FORMAT = "ImageReward.pt, the ImageReward state dict (blip.*, mlp.*)"
MED_CONFIG_FORMAT = "med_config.json, BLIP's BertConfig with add_cross_attention"
TOKENIZER_FORMAT = "a bert-base-uncased tokenizer folder (vocab.txt)"
TOKENIZER_SOURCE = "https://huggingface.co/google-bert/bert-base-uncased"


def load_tokenizer(folder: Path) -> BertTokenizer:
    """bert-base-uncased plus the two tokens BLIP's `init_tokenizer` adds (ids 30522, 30523)."""
    tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_state_dict(path: Path, net: ImageRewardNet) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked to hold exactly the network's keys."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state.pop(POSITION_IDS_KEY, None)
    missing = sorted(set(net.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(net.state_dict()))
    if missing or unexpected:
        raise ValueError(
            f"{path}: not an ImageReward state dict for this architecture; missing keys "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected keys "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    return state


class ImageReward:
    """ImageReward reward: normalised BLIP preference score of each image-prompt pair."""

    name = "imagereward"

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        med_config: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        vision: Mapping[str, int] | None = None,
        device: str = "auto",
        batch_size: int = 16,
    ) -> None:
        check_batch_size(self.name, batch_size)
        checkpoint_file = require_path(
            checkpoint,
            reward=self.name,
            option="checkpoint",
            expected=CHECKPOINT_FORMAT,
            source=SOURCE,
        )
        med_config_file = require_path(
            med_config,
            reward=self.name,
            option="med_config",
            expected=MED_CONFIG_FORMAT,
            source=SOURCE,
        )
        tokenizer_folder = require_folder(
            tokenizer_path,
            reward=self.name,
            option="tokenizer_path",
            expected=TOKENIZER_FORMAT,
            source=TOKENIZER_SOURCE,
            files=["vocab.txt"],
        )
        vision_cfg = vision_config(vision)
        text_cfg = TextConfig.from_med_config(med_config_file)
        if text_cfg.max_position_embeddings < MAX_PROMPT_TOKENS:
            raise ValueError(
                f"{med_config_file}: max_position_embeddings {text_cfg.max_position_embeddings} "
                f"< the {MAX_PROMPT_TOKENS} prompt tokens ImageReward uses"
            )
        self.tokenizer = load_tokenizer(tokenizer_folder)
        if len(self.tokenizer) != text_cfg.vocab_size:
            raise ValueError(
                f"reward {self.name!r}: tokenizer {tokenizer_folder} has {len(self.tokenizer)} "
                f"tokens with [DEC]/[ENC], med_config {med_config_file} says vocab_size "
                f"{text_cfg.vocab_size}"
            )
        self.device = resolve_device(device)
        # Built on the meta device and filled from the (memory-mapped) file: no random init of
        # ~450M parameters and no second copy of them in host memory.
        with torch.device("meta"):
            net = ImageRewardNet(vision_cfg, text_cfg)
        net.load_state_dict(load_state_dict(checkpoint_file, net), strict=True, assign=True)
        self.net = net.float().to(self.device).eval()
        self.preprocess = transforms.Compose(
            [
                transforms.Resize(
                    vision_cfg.image_size, interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.CenterCrop(vision_cfg.image_size),
                transforms.ToTensor(),
                transforms.Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )
        self.batch_size = batch_size

    @torch.inference_mode()
    def _reward(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """Normalised ImageReward [B]."""
        pixels_BCHW = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        text = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=MAX_PROMPT_TOKENS,
            return_tensors="pt",
        )
        raw_B = self.net(
            pixels_BCHW, text["input_ids"].to(self.device), text["attention_mask"].to(self.device)
        )
        return ((raw_B - REWARD_MEAN) / REWARD_STD).float().cpu().numpy()

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """ImageReward per image."""
        check_batch(self.name, images, prompts, metadata)
        return RewardOutput(
            scores=score_batches(self.name, images, prompts, self.batch_size, self._reward)
        )

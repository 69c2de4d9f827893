"""ImageReward: a tiny BLIP (ViT + 2-layer cross-attention BERT) saved as ImageReward.pt's layout."""

import json
import math

import numpy as np
import pytest
import torch

import rewards
from rewards.base import MissingCheckpointError, to_pil
from rewards.imagereward import REWARD_MEAN, REWARD_STD
from rewards.imagereward.model import ImageRewardNet, TextConfig, VisionConfig

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "sign", "stop", "on", "the", "##s"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
# The ViT width (48) differs from the BERT width (32), so cross-attention keys take 48 inputs.
TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "num_heads": 2}
TINY_MED_CONFIG = {
    "architectures": ["BertModel"],
    "hidden_act": "gelu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "vocab_size": len(VOCAB) + 2,  # + BLIP's [DEC] and [ENC]
    "encoder_width": 768,  # overwritten by the ViT width, as BLIP does
    "add_cross_attention": True,
}
# BLIP's med_config.json as ImageReward ships it.
REAL_MED_CONFIG = dict(
    TINY_MED_CONFIG,
    hidden_size=768,
    intermediate_size=3072,
    max_position_embeddings=512,
    num_attention_heads=12,
    num_hidden_layers=12,
    vocab_size=30524,
)
PROMPTS = ["a photo of a cat", "a red stop sign", "blue dogs on the sign"]


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ImageReward.pt (with BLIP's position_ids buffer), med_config.json and a BERT vocab."""
    folder = tmp_path_factory.mktemp("ImageReward")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "med_config.json").write_text(json.dumps(TINY_MED_CONFIG))
    torch.manual_seed(0)
    net = ImageRewardNet(
        VisionConfig(**TINY_VISION), TextConfig.from_med_config(folder / "med_config.json")
    )
    state = dict(net.state_dict())
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1)
    torch.save(state, folder / "ImageReward.pt")
    return {
        "checkpoint": folder / "ImageReward.pt",
        "med_config": folder / "med_config.json",
        "tokenizer_path": folder,
    }


@pytest.fixture(scope="module")
def reward(files):
    return rewards.load("imagereward", **files, vision=TINY_VISION, device="cpu", batch_size=3)


def _text(reward, prompts):
    return reward.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )


def test_scores_are_finite_deterministic_and_batch_invariant(reward):
    images = _images()
    out = reward.score(images, PROMPTS)
    assert out.scores.shape == (3,) and out.scores.dtype == np.float64
    assert np.isfinite(out.scores).all()
    assert np.array_equal(reward.score(images, PROMPTS).scores, out.scores)
    one_by_one = [
        reward.score([image], [prompt]).scores[0] for image, prompt in zip(images, PROMPTS)
    ]
    np.testing.assert_allclose(one_by_one, out.scores, atol=1e-5)


def test_score_is_the_normalised_mlp_of_the_cls_feature(reward, files):
    image, prompt = _images()[0], PROMPTS[0]
    state = torch.load(files["checkpoint"], weights_only=True)
    text = _text(reward, [prompt])
    pixels = reward.preprocess(to_pil(image))[None]
    with torch.no_grad():
        x = reward.net.cls_feature(pixels, text["input_ids"], text["attention_mask"])[0].double()
    for index in (0, 2, 4, 6, 7):  # the LAION MLP's Linear layers, no activations
        x = state[f"mlp.layers.{index}.weight"].double() @ x + state[f"mlp.layers.{index}.bias"]
    expected = (float(x) - 0.16717362830052426) / 1.0333394966054072
    assert math.isclose(reward.score([image], [prompt]).scores[0], expected, abs_tol=1e-5)
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)


def test_the_feature_ignores_padding_and_depends_on_image_and_prompt(reward):
    text = _text(reward, PROMPTS[:1])
    assert text["input_ids"].shape == (1, 35)
    assert text["input_ids"][0, 0] == reward.tokenizer.cls_token_id  # ImageReward scores [CLS]
    pixels = torch.stack([reward.preprocess(to_pil(image)) for image in _images()])
    garbage = torch.where(text["attention_mask"].bool(), text["input_ids"], 7)
    with torch.no_grad():
        feature = reward.net.cls_feature(pixels[:1], text["input_ids"], text["attention_mask"])
        padded = reward.net.cls_feature(pixels[:1], garbage, text["attention_mask"])
        other_image = reward.net.cls_feature(pixels[1:2], text["input_ids"], text["attention_mask"])
        other = _text(reward, PROMPTS[1:2])
        other_prompt = reward.net.cls_feature(
            pixels[:1], other["input_ids"], other["attention_mask"]
        )
    torch.testing.assert_close(padded, feature)
    assert not torch.allclose(other_image, feature, atol=1e-4)
    assert not torch.allclose(other_prompt, feature, atol=1e-4)


def test_real_architecture_has_the_checkpoint_shapes(tmp_path):
    """ViT-L/16 + BLIP's BERT-base, built on the meta device: the shapes ImageReward.pt holds."""
    (tmp_path / "med_config.json").write_text(json.dumps(REAL_MED_CONFIG))
    with torch.device("meta"):
        net = ImageRewardNet(
            VisionConfig(), TextConfig.from_med_config(tmp_path / "med_config.json")
        )
    shapes = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    assert len(shapes) == 294 + 316 + 4 + 10  # ViT-L, BERT-base with cross-attention, projs, MLP
    expected = {
        "blip.visual_encoder.pos_embed": (1, 197, 1024),
        "blip.visual_encoder.blocks.23.attn.qkv.weight": (3072, 1024),
        "blip.text_encoder.embeddings.word_embeddings.weight": (30524, 768),
        "blip.text_encoder.encoder.layer.0.attention.self.key.weight": (768, 768),
        "blip.text_encoder.encoder.layer.11.crossattention.self.key.weight": (768, 1024),
        "blip.vision_proj.weight": (256, 1024),
        "blip.text_proj.weight": (256, 768),
        "mlp.layers.0.weight": (1024, 768),
        "mlp.layers.7.weight": (1, 16),
    }
    assert {key: shapes[key] for key in expected} == expected


def test_missing_files_name_the_option_and_source(files, tmp_path):
    with pytest.raises(
        MissingCheckpointError, match="option 'checkpoint' is not set.*THUDM/ImageReward"
    ):
        rewards.load("imagereward")
    with pytest.raises(MissingCheckpointError, match="med_config=.*med_config.json"):
        rewards.load("imagereward", checkpoint=files["checkpoint"], med_config=tmp_path / "m.json")
    with pytest.raises(
        MissingCheckpointError, match="tokenizer_path=.*vocab.txt.*bert-base-uncased"
    ):
        rewards.load(
            "imagereward",
            checkpoint=files["checkpoint"],
            med_config=files["med_config"],
            tokenizer_path=tmp_path,
        )


def test_bad_options_and_files_raise(files, tmp_path):
    with pytest.raises(ValueError, match="unknown option.*'vit'"):
        rewards.load("imagereward", **files, vit="large")
    with pytest.raises(ValueError, match="unknown vision field.*'depthh'"):
        rewards.load("imagereward", **files, vision={"depthh": 2})
    # A deeper ViT than the file holds: the loader names the file and the missing keys.
    with pytest.raises(ValueError, match=r"ImageReward.pt: not an ImageReward state dict"):
        rewards.load("imagereward", **files, vision=dict(TINY_VISION, depth=3))
    bad_config = tmp_path / "med_config.json"
    bad_config.write_text(json.dumps(dict(TINY_MED_CONFIG, add_cross_attention=False)))
    with pytest.raises(ValueError, match="add_cross_attention"):
        rewards.load("imagereward", **dict(files, med_config=bad_config), vision=TINY_VISION)
    bad_config.write_text(json.dumps(dict(TINY_MED_CONFIG, vocab_size=99)))
    with pytest.raises(ValueError, match="vocab_size 99"):
        rewards.load("imagereward", **dict(files, med_config=bad_config), vision=TINY_VISION)

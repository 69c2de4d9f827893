"""PickScore, HPSv2.1, CLIPScore and Aesthetic on tiny random models saved in the real formats."""

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import rewards
from rewards.aesthetic import LaionMLP
from rewards.base import MissingCheckpointError, to_pil
from soar_ray.models.tokenizers import clip_l_tokenizer

OPEN_CLIP_NAME = "soar-test-tiny-clip"  # a tiny ViT CLIP registered in open_clip's model registry
PROMPTS = ["a photo of a cat", "a red stop sign", 'a sign that says "SOAR"']


def _images() -> list:
    """Two uint8 arrays and one PIL image of different sizes (the reward resizes them)."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in range(2)]
    pil = Image.fromarray(rng.integers(0, 256, size=(36, 36, 3), dtype=np.uint8))
    return [*arrays, pil]


def _features(output) -> torch.Tensor:
    """get_*_features result: a tensor in transformers 4, a ModelOutput in transformers 5."""
    return output if torch.is_tensor(output) else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _tiny_hf_clip(seed: int, projection_dim: int) -> CLIPModel:
    torch.manual_seed(seed)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=49408),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )
    return CLIPModel(config).eval()


def _tiny_processor() -> CLIPProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=clip_l_tokenizer())


def _save_processor(processor: CLIPProcessor, folder: Path) -> None:
    """The published layout: preprocessor_config.json plus the tokenizer files."""
    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    """A tiny open_clip CLIP (same CLIP class as ViT-H-14) with random weights."""
    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 16,
            "heads": 2,
            "layers": 1,
        },
    }
    config_file = tmp_path_factory.mktemp("open_clip_config") / f"{OPEN_CLIP_NAME}.json"
    config_file.write_text(json.dumps(config))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(OPEN_CLIP_NAME)
    return model.eval(), preprocess


@pytest.fixture(scope="module")
def hps_checkpoint(open_clip_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": open_clip_model[0].state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def clipscore_checkpoints(open_clip_model, tmp_path_factory):
    """The model's plain state dict, and one with the image projection negated (cos -> -cos)."""
    folder = tmp_path_factory.mktemp("clipscore")
    state = open_clip_model[0].state_dict()
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    torch.save({**state, "visual.proj": -state["visual.proj"]}, folder / "negated.bin")
    return folder / "open_clip_pytorch_model.bin", folder / "negated.bin"


@pytest.fixture(scope="module")
def pickscore_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("PickScore_v1")
    model, processor = _tiny_hf_clip(seed=1, projection_dim=16), _tiny_processor()
    model.save_pretrained(folder)
    _save_processor(processor, folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    """A CLIP folder with 768-d projections (as ViT-L/14) and a random LAION MLP state dict."""
    folder = tmp_path_factory.mktemp("clip-vit-large-patch14")
    model = _tiny_hf_clip(seed=2, projection_dim=768)
    model.save_pretrained(folder)
    _save_processor(_tiny_processor(), folder)
    torch.manual_seed(3)
    mlp_state = LaionMLP(768).state_dict()
    torch.save(mlp_state, folder / "sac+logos+ava1-l14-linearMSE.pth")
    return folder, model, mlp_state


def _open_clip_cosines(open_clip_model, images, prompts) -> np.ndarray:
    """cos of open_clip's normalised embeddings, pair by pair, from the in-memory model."""
    model, preprocess = open_clip_model
    tokenizer = open_clip.get_tokenizer(OPEN_CLIP_NAME)
    with torch.no_grad():
        pixels = torch.stack([preprocess(to_pil(image)) for image in images])
        image = _unit(model.encode_image(pixels))
        text = _unit(model.encode_text(tokenizer(prompts)))
    return (image * text).sum(-1).double().numpy()


def _check_scores(reward, images, prompts) -> np.ndarray:
    """Finite float64 [N], same on a second call and with one image per batch."""
    out = reward.score(images, prompts)
    assert out.scores.shape == (len(images),) and out.scores.dtype == np.float64
    assert np.isfinite(out.scores).all()
    assert np.array_equal(reward.score(images, prompts).scores, out.scores)
    reward.batch_size = 1
    np.testing.assert_allclose(reward.score(images, prompts).scores, out.scores, atol=1e-5)
    return out.scores


def test_hpsv2_is_the_cosine_of_the_normalised_embeddings(open_clip_model, hps_checkpoint):
    reward = rewards.load(
        "hpsv2", checkpoint=hps_checkpoint, model_name=OPEN_CLIP_NAME, device="cpu", batch_size=3
    )
    images = _images()
    scores = _check_scores(reward, images, PROMPTS)
    np.testing.assert_allclose(
        scores, _open_clip_cosines(open_clip_model, images, PROMPTS), atol=1e-5
    )
    assert np.all(np.abs(scores) <= 1.0)


def test_clipscore_is_2_5_times_the_clipped_cosine(open_clip_model, clipscore_checkpoints):
    plain, negated = clipscore_checkpoints
    images = _images()
    cosine = _open_clip_cosines(open_clip_model, images, PROMPTS)
    out = rewards.load(
        "clipscore", checkpoint=plain, model_name=OPEN_CLIP_NAME, device="cpu"
    ).score(images, PROMPTS)
    np.testing.assert_allclose(out.components["clip_cosine"], cosine, atol=1e-5)
    np.testing.assert_allclose(out.scores, 2.5 * np.maximum(cosine, 0.0), atol=1e-5)
    # The negated projection flips every cosine: each pair is clipped to 0 in exactly one model.
    flipped = rewards.load("clipscore", checkpoint=negated, model_name=OPEN_CLIP_NAME, device="cpu")
    flipped_out = flipped.score(images, PROMPTS)
    np.testing.assert_allclose(flipped_out.components["clip_cosine"], -cosine, atol=1e-5)
    np.testing.assert_allclose(flipped_out.scores, 2.5 * np.maximum(-cosine, 0.0), atol=1e-5)
    assert np.all((out.scores == 0) != (flipped_out.scores == 0))
    _check_scores(flipped, images, PROMPTS)


def test_pickscore_is_logit_scale_times_cosine(pickscore_folder):
    folder, model, processor = pickscore_folder
    reward = rewards.load("pickscore", model_path=folder, device="cpu", batch_size=2)
    images = _images()
    scores = _check_scores(reward, images, PROMPTS)
    # Hand computation on the first pair, with the public transformers API of the saved model.
    pixels = processor.image_processor(images=[to_pil(images[0])], return_tensors="pt")
    text = processor.tokenizer([PROMPTS[0]], padding=True, return_tensors="pt")
    with torch.no_grad():
        image = _unit(_features(model.get_image_features(**pixels)))
        prompt = _unit(_features(model.get_text_features(**text)))
        cosine = float((image * prompt).sum())
        expected = float(model.logit_scale.exp()) * cosine
    assert math.isclose(scores[0], expected, rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(
        reward.score(images[:1], PROMPTS[:1]).components["clip_cosine"][0], cosine, abs_tol=1e-6
    )
    scaled = rewards.load(
        "pickscore", model_path=folder, processor_path=folder, scale=1 / 26, device="cpu"
    )
    np.testing.assert_allclose(scaled.score(images, PROMPTS).scores, scores / 26, rtol=1e-6)


def test_aesthetic_is_the_linear_mlp_of_the_unit_image_embedding(aesthetic_files):
    folder, model, mlp_state = aesthetic_files
    predictor = folder / "sac+logos+ava1-l14-linearMSE.pth"
    reward = rewards.load("aesthetic", clip_path=folder, predictor_path=predictor, device="cpu")
    images = _images()
    scores = _check_scores(reward, images, ["ignored"] * 3)
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=[images[1]], return_tensors="pt")
    with torch.no_grad():
        x = _unit(_features(model.get_image_features(**pixels)))[0].double()
    for index in (0, 2, 4, 6, 7):  # the Linear layers; no activation between them
        x = mlp_state[f"layers.{index}.weight"].double() @ x + mlp_state[f"layers.{index}.bias"]
    assert math.isclose(scores[1], float(x), rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("hpsv2", {}, "option 'checkpoint' is not set"),
        ("hpsv2", {"checkpoint": "/nonexistent/HPS_v2.1_compressed.pt"}, "xswu/HPSv2"),
        ("clipscore", {"checkpoint": "/nonexistent/x.bin"}, "CLIP-ViT-H-14-laion2B-s32B-b79K"),
        ("pickscore", {}, "yuvalkirstain/PickScore_v1"),
        ("aesthetic", {"clip_path": "/nonexistent"}, "openai/clip-vit-large-patch14"),
    ],
)
def test_missing_checkpoint_names_option_and_source(name, options, message):
    with pytest.raises(MissingCheckpointError, match=message):
        rewards.load(name, **options)


def test_missing_files_inside_folders_are_named(pickscore_folder, aesthetic_files, tmp_path):
    with pytest.raises(MissingCheckpointError, match="processor_path.*preprocessor_config.json"):
        rewards.load("pickscore", model_path=pickscore_folder[0], processor_path=tmp_path)
    with pytest.raises(MissingCheckpointError, match="predictor_path.*improved-aesthetic"):
        rewards.load("aesthetic", clip_path=aesthetic_files[0], predictor_path=tmp_path / "x.pth")


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "clipscore", "aesthetic"])
def test_unknown_option_is_refused(name):
    with pytest.raises(ValueError, match="unknown option.*'checkpoint_path'"):
        rewards.load(name, checkpoint_path="x")


def test_bad_arguments_raise(hps_checkpoint):
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        rewards.load("hpsv2", checkpoint=hps_checkpoint, model_name="ViT-Nope")
    with pytest.raises(ValueError, match="batch_size"):
        rewards.load("hpsv2", checkpoint=hps_checkpoint, batch_size=0)
    reward = rewards.load("hpsv2", checkpoint=hps_checkpoint, model_name=OPEN_CLIP_NAME)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward.score(_images(), PROMPTS[:2])


def test_a_nan_score_raises_naming_the_reward_and_prompt(open_clip_model, tmp_path):
    state = open_clip_model[0].state_dict()
    path = tmp_path / "nan.pt"
    torch.save(
        {"state_dict": {**state, "visual.proj": torch.full_like(state["visual.proj"], np.nan)}},
        path,
    )
    reward = rewards.load("hpsv2", checkpoint=path, model_name=OPEN_CLIP_NAME, device="cpu")
    with pytest.raises(
        FloatingPointError, match="'hpsv2': score nan for image 0 \\(prompt 'a photo of a cat'\\)"
    ):
        reward.score(_images(), PROMPTS)

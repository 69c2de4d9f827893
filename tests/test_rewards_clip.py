"""PickScore, HPSv2.1, CLIPScore and Aesthetic on tiny random models saved in the real formats;
the image transforms of HPSv2 and Flow-GRPO's CLIPScore against tensors built by hand."""

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import rewards
from rewards.aesthetic import LaionMLP
from rewards.base import MissingCheckpointError, to_pil
from rewards.clip_common import pad_longest_transform, shortest_side_transform
from rewards.clipscore import flow_grpo_clipscore, hessel_clipscore
from soar_ray.models.tokenizers import clip_l_tokenizer

OPEN_CLIP_NAME = "soar-test-tiny-clip"  # a tiny ViT CLIP registered in open_clip's model registry
PROMPTS = ["a photo of a cat", "a red stop sign", 'a sign that says "SOAR"']
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)  # the tiny model's (default) mean
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)


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


def _open_clip_cosines(open_clip_model, images, prompts, preprocess=None) -> np.ndarray:
    """cos of open_clip's normalised embeddings, pair by pair, from the in-memory model (its own
    eval transform unless `preprocess` is given)."""
    model, default_preprocess = open_clip_model
    preprocess = preprocess or default_preprocess
    tokenizer = open_clip.get_tokenizer(OPEN_CLIP_NAME)
    with torch.no_grad():
        pixels = torch.stack([preprocess(to_pil(image)) for image in images])
        image = _unit(model.encode_image(pixels))
        text = _unit(model.encode_text(tokenizer(prompts)))
    return (image * text).sum(-1).double().numpy()


def _hand_padded(image: Image.Image) -> torch.Tensor:
    """HPSv2's transform to 32 px, sizes by hand: [0, 1] tensor, longest side to 32, black pad."""
    pixels = TF.to_tensor(image)
    canvas = torch.zeros(3, 32, 32)  # black, before normalisation
    if image.size == (48, 40):  # W x H: 40 * 32 / 48 = 26.67 -> 27 rows, 5 padding rows: 2 + 3
        resized = TF.resize(pixels, [27, 32], TF.InterpolationMode.BICUBIC, antialias=True)
        canvas[:, 2:29, :] = resized
    elif image.size == (20, 32):  # longest side already 32: no resize, 12 columns: 6 + 6
        canvas[:, :, 6:26] = pixels
    else:  # square 36: resized, no padding
        canvas = TF.resize(pixels, [32, 32], TF.InterpolationMode.BICUBIC, antialias=True)
    return (canvas - MEAN) / STD


def _hand_cropped(image: Image.Image) -> torch.Tensor:
    """Flow-GRPO's CLIP transform to 32 px for a 48 x 40 (W x H) image, sizes by hand: shortest
    side 40 -> 32, longest int(32 * 48 / 40) = 38, bilinear; columns 3-34 (round(6 / 2) = 3)."""
    assert image.size == (48, 40)
    resized = TF.resize(
        TF.to_tensor(image), [32, 38], TF.InterpolationMode.BILINEAR, antialias=True
    )
    return (resized[:, :, 3:35] - MEAN) / STD


def _check_scores(reward, images, prompts) -> np.ndarray:
    """Finite float64 [N], same on a second call and with one image per batch."""
    out = reward.score(images, prompts)
    assert out.scores.shape == (len(images),) and out.scores.dtype == np.float64
    assert np.isfinite(out.scores).all()
    assert np.array_equal(reward.score(images, prompts).scores, out.scores)
    reward.batch_size = 1
    np.testing.assert_allclose(reward.score(images, prompts).scores, out.scores, atol=1e-5)
    return out.scores


def test_hpsv2_pads_the_longest_side_to_a_square() -> None:
    rng = np.random.default_rng(1)
    wide = Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 256, size=(32, 20, 3), dtype=np.uint8))
    square = Image.fromarray(rng.integers(0, 256, size=(36, 36, 3), dtype=np.uint8))
    transform = pad_longest_transform(
        32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    )
    for image in (wide, tall, square):
        torch.testing.assert_close(transform(image), _hand_padded(image), rtol=0, atol=1e-6)
    # The two padding rows above the wide image are black: (0 - mean) / std in every pixel.
    black = (-MEAN / STD).expand(3, 2, 32)
    torch.testing.assert_close(transform(wide)[:, :2], black, rtol=0, atol=1e-6)
    assert not torch.allclose(transform(wide)[:, 2], black[:, 0])  # row 2 is the image


def test_hpsv2_is_the_cosine_of_the_normalised_embeddings(open_clip_model, hps_checkpoint):
    reward = rewards.load(
        "hpsv2", checkpoint=hps_checkpoint, model_name=OPEN_CLIP_NAME, device="cpu", batch_size=3
    )
    images = _images()
    scores = _check_scores(reward, images, PROMPTS)
    expected = _open_clip_cosines(open_clip_model, images, PROMPTS, preprocess=_hand_padded)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    # open_clip's centre crop drops the wide images' sides: a different score.
    assert not np.allclose(scores[:2], _open_clip_cosines(open_clip_model, images, PROMPTS)[:2])
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


def test_clipscore_formulas_hand_computed() -> None:
    cosine = np.array([0.3, -0.15, 0.0, 0.27])
    np.testing.assert_allclose(hessel_clipscore(cosine), [0.75, 0.0, 0.0, 0.675])
    # Flow-GRPO: exp(logit_scale) * cos / 30, with OpenAI CLIP's exp(logit_scale) = 100.
    np.testing.assert_allclose(flow_grpo_clipscore(cosine, 100.0), [1.0, -0.5, 0.0, 0.9])
    np.testing.assert_allclose(flow_grpo_clipscore(cosine, 15.0), [0.15, -0.075, 0.0, 0.135])


def test_clipscore_flow_grpo_variant(open_clip_model, clipscore_checkpoints):
    plain, _ = clipscore_checkpoints
    reward = rewards.load(
        "clipscore", checkpoint=plain, model_name=OPEN_CLIP_NAME, variant="flow_grpo", device="cpu"
    )
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in range(3)]
    transform = reward.towers.preprocess
    assert torch.equal(transform(to_pil(images[0])), _hand_cropped(to_pil(images[0])))
    out = reward.score(images, PROMPTS)
    cosine = _open_clip_cosines(open_clip_model, images, PROMPTS, preprocess=_hand_cropped)
    np.testing.assert_allclose(out.components["clip_cosine"], cosine, atol=1e-5)
    logit_scale = float(open_clip_model[0].logit_scale.detach().exp())  # 1 / 0.07, open_clip's init
    assert math.isclose(logit_scale, 1 / 0.07, rel_tol=1e-6)
    np.testing.assert_allclose(out.scores, logit_scale * cosine / 30, atol=1e-5)
    assert (out.scores < 0).any()  # no clipping at 0, unlike CLIPScore's eq. 1
    with pytest.raises(ValueError, match="variant must be one of"):
        rewards.load("clipscore", checkpoint=plain, variant="paper")
    with pytest.raises(MissingCheckpointError, match="timm/vit_large_patch14_clip_224.openai"):
        rewards.load("clipscore", variant="flow_grpo")


def test_shortest_side_transform_of_a_tall_image() -> None:
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    transform = shortest_side_transform(
        32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    )
    # Shortest side 40 -> 32, longest int(32 * 50 / 40) = 40 rows; rows 4-35 (round(8 / 2) = 4).
    resized = TF.resize(
        TF.to_tensor(image), [40, 32], TF.InterpolationMode.BILINEAR, antialias=True
    )
    torch.testing.assert_close(transform(image), (resized[:, 4:36] - MEAN) / STD, rtol=0, atol=0)


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

"""JPEG compressibility / incompressibility (DDPO): scores against PIL's JPEG q95 size computed
here independently, flat vs noise ordering, PIL and uint8 inputs, loading and option checks."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rewards
from rewards.jpeg import JpegCompressibility, JpegIncompressibility

CAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "cat.jpg"


def _kb(pixels: np.ndarray) -> float:
    """DDPO's size: bytes of the uint8 RGB array saved by PIL as JPEG at quality 95, over 1000."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def _noise(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _flat(size: int = 64) -> np.ndarray:
    return np.full((size, size, 3), (200, 30, 90), np.uint8)


@pytest.fixture(scope="module")
def compress() -> JpegCompressibility:
    return rewards.load("jpeg_compressibility", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def incompress() -> JpegIncompressibility:
    return rewards.load("jpeg_incompressibility", device="cpu", batch_size=4)


def test_score_is_minus_the_jpeg_q95_size_in_kb(compress: JpegCompressibility) -> None:
    noise = _noise(0)
    out = compress.score([Image.fromarray(noise)], ["a prompt"])
    expected = _kb(noise)
    assert expected > 1.0  # 64x64 noise does not compress: several kB
    assert out.scores.tolist() == [-expected]
    assert out.components == {}  # the score is the size: no component repeats it


def test_flat_image_compresses_better_than_noise(compress: JpegCompressibility) -> None:
    out = compress.score([_flat(), _noise(1)], ["flat", "noise"])
    assert out.scores[0] > out.scores[1]
    assert -out.scores[0] < -out.scores[1] / 4


def test_incompressibility_is_minus_compressibility_on_pil_and_uint8(
    compress: JpegCompressibility, incompress: JpegIncompressibility
) -> None:
    # 6 images over batches of 4: mixed PIL (one RGBA, converted to RGB) and uint8 arrays.
    arrays = [_noise(2), _flat(), _noise(3, 32), _noise(4, 48), _flat(16), _noise(5)]
    images = [Image.fromarray(a) if i % 2 else a for i, a in enumerate(arrays)]
    images[3] = Image.fromarray(arrays[3]).convert("RGBA")
    prompts = [f"p{i}" for i in range(len(images))]
    expected = [_kb(a) for a in arrays]
    low, high = compress.score(images, prompts), incompress.score(images, prompts)
    np.testing.assert_array_equal(high.scores, expected)
    np.testing.assert_array_equal(low.scores, -high.scores)
    assert (high.scores > 0).all()
    # a uint8 array and its PIL image score the same
    pil_only = incompress.score([Image.fromarray(a) for a in arrays], prompts)
    np.testing.assert_array_equal(pil_only.scores, high.scores)


@pytest.mark.skipif(not CAT.is_file(), reason=f"shared test image {CAT} is absent")
def test_real_photo_scores_its_pixels(
    compress: JpegCompressibility, incompress: JpegIncompressibility
) -> None:
    cat = Image.open(CAT)  # carries a JPEG comment that PIL would write back: it must not count
    pixels = np.asarray(cat.convert("RGB"))
    expected = _kb(pixels)
    assert expected > 10.0  # a 578x579 photo at q95: tens of kB
    assert compress.score([cat], ["a cat"]).scores.tolist() == [-expected]
    out = incompress.score([pixels], ["a cat"])
    assert out.scores.tolist() == [expected]


def test_options_and_batch_checks(compress: JpegCompressibility) -> None:
    with pytest.raises(
        ValueError, match=r"'jpeg_compressibility': unknown option\(s\) \['quality'\]"
    ):
        rewards.load("jpeg_compressibility", quality=80)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        rewards.load("jpeg_incompressibility", batch_size=0)
    with pytest.raises(ValueError, match="jpeg_compressibility: device must be"):
        rewards.load("jpeg_compressibility", device="tpu")
    assert rewards.load("jpeg_incompressibility", device="cuda:1").name == "jpeg_incompressibility"
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        compress.score([_flat()], ["a", "b"])
    with pytest.raises(ValueError, match="uint8"):
        compress.score([_flat().astype(np.float32)], ["a"])
    assert compress.score([], []).scores.shape == (0,)

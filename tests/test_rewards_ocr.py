"""OCR reward: the scoring rule by hand, target parsing, and rapidocr's real PP-OCR weights on a
photo and on text rendered with PIL."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import rewards
from rewards.ocr import OcrReward, ocr_score, target_text

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent"
)


def test_ocr_score_hand_computed() -> None:
    assert ocr_score("xxHello Worldxx", "hello world") == 1.0  # target contained: d = 0
    assert ocr_score("Helo World", "Hello World") == pytest.approx(1 - 1 / 10)  # one insertion
    assert ocr_score("SOAR", "sour") == pytest.approx(1 - 1 / 4)  # one substitution
    assert ocr_score("", "abc") == 0.0  # d = 3 = len(target)
    assert ocr_score("zzzzzzzz", "ab") == 0.0  # d = 8 capped at len(target) = 2


def test_target_is_the_first_quoted_span_unless_metadata_gives_it() -> None:
    assert target_text('a sign "Hello World" next to "Other"') == "helloworld"
    assert target_text('a sign "Hello World"', {"target_text": "Soar Ray"}) == "soarray"
    with pytest.raises(ValueError, match="'a plain prompt' has no double-quoted target"):
        target_text("a plain prompt")
    with pytest.raises(ValueError, match="is empty"):
        target_text('a sign " "')


@pytest.fixture(scope="module")
def ocr() -> OcrReward:
    return rewards.load("ocr", device="cpu")


def _rendered(text: str) -> Image.Image:
    image = Image.new("RGB", (320, 96), "white")
    ImageDraw.Draw(image).text((12, 20), text, fill="black", font=ImageFont.load_default(size=48))
    return image


@needs_shared
def test_reads_the_photo_and_rendered_text(ocr: OcrReward) -> None:
    photo = Image.open(SHARED_DATA / "images" / "hello_world.jpg")
    rendered = _rendered("SOAR RAY")
    blank = np.full((96, 320, 3), 255, np.uint8)
    prompts = [
        'a photo of a sign saying "Hello World"',
        'a banner with "Soar Ray" on it',
        'a banner with "Flow GRPO" on it',
        'a banner with "Soar Ray" on it',
    ]
    out = ocr.score([photo, rendered, rendered, blank], prompts)
    assert out.scores[0] == 1.0 and out.scores[1] == 1.0
    read = ocr.read(rendered).replace(" ", "").lower()
    assert read == "soarray"
    assert out.scores[2] == ocr_score(read, "flowgrpo") and out.scores[2] < 0.5
    assert out.scores[3] == 0.0  # nothing read: d = len(target)
    np.testing.assert_array_equal(out.components["ocr_exact"], [1.0, 1.0, 0.0, 0.0])
    again = ocr.score([rendered, rendered, blank], prompts[1:])  # deterministic
    np.testing.assert_array_equal(again.scores, out.scores[1:])


def test_metadata_target_and_batch_checks(ocr: OcrReward) -> None:
    rendered = _rendered("SOAR RAY")
    out = ocr.score([rendered], ['a banner with "Flow GRPO"'], [{"target_text": "SOAR RAY"}])
    assert out.scores.tolist() == [1.0]
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        ocr.score([rendered], ['"a"', '"b"'])
    with pytest.raises(ValueError, match="device must be"):
        rewards.load("ocr", device="tpu")

"""multi: the weighted sum of real rewards (OCR and GenEval on one image showing both a stop
sign and the text STOP) keeps every component; bad weights and options are refused."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rewards

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STOP_IMAGE = SHARED_DATA / "images" / "giraffe_and_stop_sign.png"


@pytest.mark.skipif(not STOP_IMAGE.is_file(), reason=f"shared image {STOP_IMAGE} is absent")
def test_weighted_sum_keeps_every_component() -> None:
    multi = rewards.load(
        "multi",
        weights={"ocr": 2.0, "geneval": 0.5},
        options={"geneval": {"score_threshold": 0.5}},
        device="cpu",
    )
    assert multi.rewards["geneval"].thresholds.score == 0.5  # its own options reach it
    images = [Image.open(STOP_IMAGE), np.full((96, 96, 3), 255, np.uint8)]
    prompt = 'a photo of a stop sign that reads "STOP"'
    row = {
        "tag": "single_object",
        "include": [{"class": "stop sign", "count": 1}],
        "prompt": prompt,
    }
    out = multi.score(images, [prompt] * 2, [row, row])
    # The photo: OCR reads STOP (1) and the sign is found (1); the blank image: 0 and 0.
    np.testing.assert_array_equal(out.scores, [2.0 * 1.0 + 0.5 * 1.0, 0.0])
    assert set(out.components) == {
        "ocr",
        "ocr_exact",
        "ocr_error",
        "geneval",
        "geneval_accuracy",
        "geneval_strict",
    }
    np.testing.assert_array_equal(out.components["ocr"], [1.0, 0.0])
    np.testing.assert_array_equal(out.components["geneval_strict"], [1.0, 0.0])


def test_bad_weights_and_options_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one reward"):
        rewards.load("multi", weights={})
    with pytest.raises(ValueError, match=r"options given for \['geneval'\]"):
        rewards.load("multi", weights={"ocr": 1.0}, options={"geneval": {}})
    with pytest.raises(ValueError, match="must be a finite number"):
        rewards.load("multi", weights={"ocr": float("nan")})
    with pytest.raises(ValueError, match="cannot contain 'multi'"):
        rewards.load("multi", weights={"multi": 1.0})
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.load("multi", weights={"nope": 1.0})
    with pytest.raises(ValueError, match="reward 'ocr': unknown option"):
        rewards.load("multi", weights={"ocr": 1.0}, options={"ocr": {"langs": "en"}})

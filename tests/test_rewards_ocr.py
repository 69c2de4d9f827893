"""OCR reward: the scoring rule by hand, target parsing, and rapidocr's real PP-OCR weights on a
photo and on text rendered with PIL; the Flow-GRPO engine's configuration and model checks, and
a real engine failure (a recogniser loaded as the detector), which scores 0 and is counted."""

import logging
from pathlib import Path

import numpy as np
import pytest
import rapidocr
from PIL import Image, ImageDraw, ImageFont

import rewards
from rewards.base import MissingCheckpointError
from rewards.ocr import FLOW_GRPO_MODELS, OcrReward, ocr_score, target_text

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent"
)
# The multilingual PP-OCRv6 models inside the rapidocr wheel stand in for the English ones.
SHIPPED = Path(rapidocr.__file__).parent / "models"
SHIPPED_DET, SHIPPED_REC = SHIPPED / "PP-OCRv6_det_small.onnx", SHIPPED / "PP-OCRv6_rec_small.onnx"


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
    np.testing.assert_array_equal(out.components["ocr_error"], [0.0, 0.0, 0.0, 0.0])
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


def model_dir(folder: Path, det: Path, rec: Path) -> Path:
    """A Flow-GRPO model folder whose two files link to `det` and `rec`."""
    folder.mkdir()
    (folder / FLOW_GRPO_MODELS["Det"]).symlink_to(det)
    (folder / FLOW_GRPO_MODELS["Rec"]).symlink_to(rec)
    return folder


def test_flow_grpo_engine_runs_paddleocrs_settings(tmp_path: Path) -> None:
    folder = model_dir(tmp_path / "models", SHIPPED_DET, SHIPPED_REC)
    reward = rewards.load("ocr", engine="flow_grpo", model_dir=str(folder), device="cpu")
    det = reward.engine.cfg.Det
    assert (det.box_thresh, det.unclip_ratio, det.use_dilation) == (0.6, 1.5, False)
    assert (det.limit_type, det.limit_side_len) == ("max", 960)
    assert list(det.mean) == [0.485, 0.456, 0.406] and list(det.std) == [0.229, 0.224, 0.225]
    assert det.model_path == str(folder / "en_PP-OCRv3_det_mobile.onnx")
    assert reward.engine.cfg.Rec.model_path == str(folder / "en_PP-OCRv4_rec_mobile.onnx")
    shipped = rewards.load("ocr", device="cpu").engine.cfg.Det
    assert (shipped.box_thresh, shipped.unclip_ratio, shipped.use_dilation) == (0.5, 1.6, True)
    out = reward.score([_rendered("SOAR RAY")], ['a banner with "Soar Ray" on it'])
    assert out.scores.tolist() == [1.0] and out.components["ocr_error"].tolist() == [0.0]


def test_an_engine_failure_scores_zero_and_is_counted(tmp_path: Path, caplog) -> None:
    # A recogniser as the detector: it loads, but its input height is fixed at 48 px, so
    # onnxruntime rejects every detector input (a multiple of 32) while scoring.
    folder = model_dir(tmp_path / "models", SHIPPED_REC, SHIPPED_REC)
    reward = rewards.load("ocr", engine="flow_grpo", model_dir=folder, device="cpu")
    prompts = ['a banner with "Soar Ray" on it', 'a sign "RAY"']
    with caplog.at_level(logging.WARNING, logger="rewards.ocr"):
        out = reward.score([_rendered("SOAR RAY"), _rendered("RAY")], prompts)
    assert out.scores.tolist() == [0.0, 0.0]
    assert out.components["ocr_error"].tolist() == [1.0, 1.0]
    assert out.components["ocr_exact"].tolist() == [0.0, 0.0]
    assert "the engine failed on the image of 'a sign \"RAY\"'" in caplog.text
    assert "Got invalid dimensions for input" in caplog.text


def test_flow_grpo_model_dir_is_checked(tmp_path: Path) -> None:
    with pytest.raises(MissingCheckpointError, match="option 'model_dir' is not set"):
        rewards.load("ocr", engine="flow_grpo")
    half = tmp_path / "half"
    half.mkdir()
    (half / FLOW_GRPO_MODELS["Det"]).symlink_to(SHIPPED_DET)
    missing = str(half / "en_PP-OCRv4_rec_mobile.onnx")
    with pytest.raises(MissingCheckpointError, match=f"model_dir='{missing}' does not exist"):
        rewards.load("ocr", engine="flow_grpo", model_dir=half)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / FLOW_GRPO_MODELS["Det"]).write_bytes(b"not a model")
    (garbage / FLOW_GRPO_MODELS["Rec"]).symlink_to(SHIPPED_REC)
    with pytest.raises(ValueError, match="en_PP-OCRv3_det_mobile.onnx' is not an ONNX model"):
        rewards.load("ocr", engine="flow_grpo", model_dir=garbage)
    with pytest.raises(ValueError, match="model_dir is read by engine 'flow_grpo' only"):
        rewards.load("ocr", model_dir=tmp_path)
    with pytest.raises(ValueError, match="engine must be one of"):
        rewards.load("ocr", engine="paddleocr")


def test_a_recogniser_without_characters_needs_en_dict(tmp_path: Path) -> None:
    # The detector model carries no 'character' metadata: as a recogniser it needs en_dict.txt.
    folder = model_dir(tmp_path / "models", SHIPPED_DET, SHIPPED_DET)
    with pytest.raises(MissingCheckpointError, match="en_dict.txt.*has no 'character' metadata"):
        rewards.load("ocr", engine="flow_grpo", model_dir=folder, device="cpu")
    (folder / "en_dict.txt").write_text("a\nb\n")
    reward = rewards.load("ocr", engine="flow_grpo", model_dir=folder, device="cpu")
    assert reward.engine.cfg.Rec.rec_keys_path == str(folder / "en_dict.txt")

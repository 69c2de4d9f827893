"""OCR reward (SPEC §5): how closely the text rapidocr reads matches the prompt's quoted text.

The target is metadata["target_text"] when given (the OCR prompt set stores it), else the first
double-quoted span of the prompt. Both texts lose their spaces and are lower-cased, as in
Flow-GRPO; d = 0 if the target occurs in the recognised text, else their Levenshtein distance
capped at len(target); score = 1 - d / len(target).

Two engines, both rapidocr on onnxruntime:
- `engine="flow_grpo"`, the choice for numbers comparable with Flow-GRPO: the models and settings
  of Flow-GRPO's PaddleOCR 2.9.1 `lang="en"` reader (English PP-OCRv3 detector, English PP-OCRv4
  recogniser, box threshold 0.6, unclip ratio 1.5, no dilation, ImageNet normalisation, longest
  side at most 960, no angle classifier). `model_dir` holds the two ONNX files of FLOW_GRPO_MODELS:
  rapidocr's model list (rapidocr/default_models.yaml, onnxruntime PP-OCRv4 section) names where
  they are published, or convert PaddleOCR's en_PP-OCRv3_det / en_PP-OCRv4_rec inference models
  with paddle2onnx (then add PaddleOCR's en_dict.txt beside them). Flow-GRPO hands PaddleOCR RGB
  arrays, which PaddleOCR reads as BGR; this engine does the same.
- `engine="shipped"` (default, offline): the multilingual PP-OCRv6 models inside the rapidocr wheel
  with rapidocr's detector settings (box threshold 0.5, unclip ratio 1.6, dilation), longest side
  at most 960. It reads English text well, but its scores differ from Flow-GRPO's.

An exception of the OCR engine on an image scores that image 0, as in Flow-GRPO, and sets its
component `ocr_error` to 1 (a warning names the prompt). Component `ocr_exact`: target found.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from Levenshtein import distance

from rewards.base import (
    ImageLike,
    RewardOutput,
    check_batch,
    check_batch_size,
    require_path,
    to_pil,
    to_uint8,
)

logger = logging.getLogger(__name__)

ENGINES = ("shipped", "flow_grpo")
FLOW_GRPO_MODELS = {"Det": "en_PP-OCRv3_det_mobile.onnx", "Rec": "en_PP-OCRv4_rec_mobile.onnx"}
FLOW_GRPO_DICT = "en_dict.txt"  # needed only when the recogniser carries no character list
FLOW_GRPO_SOURCE = (
    "rapidocr's model list (rapidocr/default_models.yaml, onnxruntime PP-OCRv4 det/rec) or "
    "PaddleOCR's en_PP-OCRv3_det / en_PP-OCRv4_rec converted with paddle2onnx"
)
# PaddleOCR 2.9.1's defaults (tools/infer/utility.py) where rapidocr's differ; detector input
# sizing (longest side at most 960, never enlarged) is common to both engines.
FLOW_GRPO_PARAMS = {
    "Det.box_thresh": 0.6,
    "Det.unclip_ratio": 1.5,
    "Det.use_dilation": False,
    "Det.mean": [0.485, 0.456, 0.406],
    "Det.std": [0.229, 0.224, 0.225],
    # PaddleOCR neither rescales the image into [30, 2000] nor pads short or wide images.
    "Global.use_preprocess_img": False,
    "Global.use_vertical_padding": False,
}


def normalize_text(text: str) -> str:
    """Spaces removed, lower-cased: the form both texts are compared in."""
    return text.replace(" ", "").lower()


def target_text(prompt: str, metadata: Mapping[str, Any] | None = None) -> str:
    """metadata["target_text"], else the prompt's first double-quoted span, normalised."""
    if metadata is not None and "target_text" in metadata:
        raw = metadata["target_text"]
        if not isinstance(raw, str):
            raise ValueError(f"ocr: metadata target_text of prompt {prompt!r} is not a string")
    else:
        parts = prompt.split('"')
        if len(parts) < 3:
            raise ValueError(f"ocr: prompt {prompt!r} has no double-quoted target text")
        raw = parts[1]
    target = normalize_text(raw)
    if not target:
        raise ValueError(f"ocr: the target text of prompt {prompt!r} is empty")
    return target


def ocr_score(recognized: str, target: str) -> float:
    """1 - d / len(target); d = 0 if target in recognized, else the capped Levenshtein distance."""
    recognized, target = normalize_text(recognized), normalize_text(target)
    if not target:
        raise ValueError("ocr: empty target text")
    d = 0 if target in recognized else min(distance(recognized, target), len(target))
    return 1.0 - d / len(target)


def _resolve_ocr_device(device: str) -> tuple[bool, int]:
    """(use CUDA, device id) for onnxruntime; 'auto' takes CUDA only where onnxruntime has it."""
    import onnxruntime

    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device == "auto":
        return has_cuda, 0
    if device == "cpu":
        return False, 0
    if device == "cuda" or device.startswith("cuda:"):
        if not has_cuda:
            raise ValueError(
                f"ocr: device={device!r} but onnxruntime has no CUDAExecutionProvider "
                "(install onnxruntime-gpu, or use device='cpu')"
            )
        return True, int(device.partition(":")[2] or 0)
    raise ValueError(f"ocr: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _onnx_metadata(path: Path) -> dict[str, str]:
    """The custom metadata of an ONNX model; a file onnxruntime cannot load is an error naming it."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ValueError(
            f"ocr: model_dir file {str(path)!r} is not an ONNX model: {error}"
        ) from error
    return dict(session.get_modelmeta().custom_metadata_map)


def _in_model_dir(path: Path | str | None, expected: str, source: str = FLOW_GRPO_SOURCE) -> Path:
    """`path` if it exists, else an error naming the model_dir option, the file and its source."""
    return require_path(path, reward="ocr", option="model_dir", expected=expected, source=source)


def flow_grpo_params(model_dir: str | Path | None) -> dict[str, Any]:
    """rapidocr params of the Flow-GRPO engine: the two model files of `model_dir`, checked."""
    folder = _in_model_dir(model_dir, f"a folder with {' and '.join(FLOW_GRPO_MODELS.values())}")
    params: dict[str, Any] = dict(FLOW_GRPO_PARAMS)
    for section, name in FLOW_GRPO_MODELS.items():
        params[f"{section}.model_path"] = str(
            _in_model_dir(folder / name, f"the ONNX model {name}")
        )
    _onnx_metadata(Path(params["Det.model_path"]))
    if "character" not in _onnx_metadata(Path(params["Rec.model_path"])):
        # Without a character list in the model, rapidocr would download one: ask for the file.
        expected = f"{FLOW_GRPO_DICT}, as {params['Rec.model_path']} has no 'character' metadata"
        dictionary = _in_model_dir(folder / FLOW_GRPO_DICT, expected, "PaddleOCR's en_dict.txt")
        params["Rec.rec_keys_path"] = str(dictionary)
    return params


class OcrReward:
    """rapidocr (PP-OCR on onnxruntime) reading scored against the prompt's target text."""

    name = "ocr"

    def __init__(
        self,
        device: str = "auto",  # onnxruntime's CUDA provider when present, else CPU
        batch_size: int = 16,  # common option; rapidocr reads one image at a time anyway
        min_text_score: float = 0.5,  # drop lines read with less confidence (PaddleOCR's 0.5)
        num_threads: int = -1,  # onnxruntime intra-op threads; -1: onnxruntime's default
        engine: str = "shipped",  # "shipped" (wheel's models) or "flow_grpo" (comparable numbers)
        model_dir: str | Path | None = None,  # engine "flow_grpo": folder of FLOW_GRPO_MODELS
    ) -> None:
        from rapidocr import RapidOCR

        check_batch_size("ocr", batch_size)
        if not 0.0 <= min_text_score <= 1.0:
            raise ValueError(f"ocr: min_text_score must be in [0, 1], got {min_text_score}")
        if engine not in ENGINES:
            raise ValueError(f"ocr: engine must be one of {ENGINES}, got {engine!r}")
        if engine != "flow_grpo" and model_dir is not None:
            raise ValueError(f"ocr: model_dir is read by engine 'flow_grpo' only, not {engine!r}")
        use_cuda, device_id = _resolve_ocr_device(device)
        self.engine_name = engine
        self.engine = RapidOCR(
            params={
                "Global.log_level": "error",  # an image without text is a normal case here
                "Global.use_cls": False,  # generated text is upright, as Flow-GRPO assumes
                "Global.text_score": min_text_score,
                # PaddleOCR's detector sizing, as Flow-GRPO ran it: shrink the longer side to 960
                # at most, never enlarge (rapidocr's default enlarges the short side to 736).
                "Det.limit_type": "max",
                "Det.limit_side_len": 960,
                "EngineConfig.onnxruntime.intra_op_num_threads": num_threads,
                "EngineConfig.onnxruntime.use_cuda": use_cuda,
                "EngineConfig.onnxruntime.cuda_ep_cfg.device_id": device_id,
                **(flow_grpo_params(model_dir) if engine == "flow_grpo" else {}),
            }
        )

    def read(self, image: ImageLike) -> str:
        """All text the engine recognises in the image, lines joined in reading order."""
        # rapidocr converts a PIL image to BGR but takes an array as BGR already: the Flow-GRPO
        # engine gets the RGB array, as PaddleOCR got it from Flow-GRPO.
        pixels = to_uint8(image) if self.engine_name == "flow_grpo" else to_pil(image)
        output = self.engine(pixels, use_det=True, use_cls=False, use_rec=True)
        return "".join(output.txts or ())

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """1 - capped normalised edit distance to the target text, per image; 0 where OCR failed."""
        rows = check_batch(self.name, images, prompts, metadata)
        targets = [target_text(prompt, row) for prompt, row in zip(prompts, rows)]
        recognized, failed = [], []
        for image, prompt in zip(images, prompts):
            try:
                text = normalize_text(self.read(image))
            except Exception as error:  # Flow-GRPO's rule: a failed read scores 0 (d = len)
                logger.warning("ocr: the engine failed on the image of %r: %s", prompt, error)
                text = None
            recognized.append(text)
            failed.append(text is None)
        scores = np.array(
            [0.0 if r is None else ocr_score(r, t) for r, t in zip(recognized, targets)]
        )
        exact = [r is not None and t in r for r, t in zip(recognized, targets)]
        return RewardOutput(
            scores,
            {"ocr_exact": np.array(exact, np.float64), "ocr_error": np.array(failed, np.float64)},
        )

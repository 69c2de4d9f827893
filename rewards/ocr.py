"""OCR reward (SPEC §5): how closely the text rapidocr reads matches the prompt's quoted text.

The target is metadata["target_text"] when given (the OCR prompt set stores it), else the first
double-quoted span of the prompt. Both texts lose their spaces and are lower-cased, as in
Flow-GRPO; d = 0 if the target occurs in the recognised text, else their Levenshtein distance
capped at len(target); score = 1 - d / len(target). Component `ocr_exact`: the target was found.
rapidocr ships its PP-OCR ONNX weights, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from Levenshtein import distance

from rewards.base import ImageLike, RewardOutput, check_batch, check_batch_size, to_pil


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


class OcrReward:
    """rapidocr (PP-OCR on onnxruntime) reading scored against the prompt's target text."""

    name = "ocr"

    def __init__(
        self,
        device: str = "auto",  # onnxruntime's CUDA provider when present, else CPU
        batch_size: int = 16,  # common option; rapidocr reads one image at a time anyway
        min_text_score: float = 0.5,  # drop lines read with less confidence (PP-OCR default)
        num_threads: int = -1,  # onnxruntime intra-op threads; -1: onnxruntime's default
    ) -> None:
        from rapidocr import RapidOCR

        check_batch_size("ocr", batch_size)
        if not 0.0 <= min_text_score <= 1.0:
            raise ValueError(f"ocr: min_text_score must be in [0, 1], got {min_text_score}")
        use_cuda, device_id = _resolve_ocr_device(device)
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
            }
        )

    def read(self, image: ImageLike) -> str:
        """All text rapidocr recognises in the image, lines joined in reading order."""
        return "".join(self.engine(to_pil(image)).txts or ())

    def score(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> RewardOutput:
        """1 - capped normalised edit distance to the target text, per image."""
        rows = check_batch(self.name, images, prompts, metadata)
        targets = [target_text(prompt, row) for prompt, row in zip(prompts, rows)]
        recognized = [normalize_text(self.read(image)) for image in images]
        scores = np.array([ocr_score(r, t) for r, t in zip(recognized, targets)])
        exact = np.array([t in r for r, t in zip(recognized, targets)], dtype=np.float64)
        return RewardOutput(scores, {"ocr_exact": exact})

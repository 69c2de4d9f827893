"""GenEval: the rules on hand-built detections for every tag, Flow-GRPO's partial credit on the
same detections against numbers worked out by hand from its reward server, pixel colours, the
yolov3-tiny backend on a real image, the CLIP colour path on a tiny open_clip model, the mmdet
backend."""

import importlib.util
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rewards
from rewards.base import MissingCheckpointError
from rewards.geneval import GenEvalResult, GenEvalReward, memoized_colors, summarize
from rewards.geneval.color import PixelColorClassifier, pixel_colors
from rewards.geneval.detectors import CLASSES, Detection, YoloDetector, missing_weights
from rewards.geneval.partial_credit import PartialCredit, count_credit, evaluate_partial
from rewards.geneval.rules import (
    COLORS,
    TAGS,
    RuleResult,
    Thresholds,
    box_iou,
    evaluate,
    parse_spec,
    relative_position,
    select_objects,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent"
)
STOP_IMAGE = SHARED_DATA / "images" / "giraffe_and_stop_sign.png"
RED, BLUE = (220, 20, 20), (30, 60, 220)


def det(label: str, box: tuple[float, float, float, float], score: float = 0.95) -> Detection:
    return Detection(label, score, box)


def clause(cls: str, count: int = 1, **extra: object) -> dict:
    """An include or exclude clause of a GenEval metadata row."""
    return {"class": cls, "count": count, **extra}


def meta(tag: str, *include: dict, exclude: tuple[dict, ...] = ()) -> dict:
    """A GenEval metadata row."""
    return {"tag": tag, "prompt": f"a {tag} prompt", "include": [*include], "exclude": [*exclude]}


def no_colors(cls: str, objects: list[Detection]) -> list[str]:
    raise AssertionError("colour asked for on a prompt without colours")


def judge(row: dict, detections: list[Detection], colors=no_colors) -> RuleResult:
    """The rules on hand-built detections, with GenEval's default thresholds."""
    spec = parse_spec(row, row["prompt"])
    return evaluate(spec, select_objects(detections, spec.tag, Thresholds()), colors)


def credit(row: dict, detections: list[Detection], colors=no_colors) -> PartialCredit:
    """Flow-GRPO's partial credit on hand-built detections, GenEval's default thresholds."""
    spec = parse_spec(row, row["prompt"])
    return evaluate_partial(spec, select_objects(detections, spec.tag, Thresholds()), colors)


def two_patches() -> np.ndarray:
    """Grey 80 x 40 image: a red square at x 5-35, a blue one at x 45-75 (y 5-35)."""
    image = np.full((40, 80, 3), 128, np.uint8)
    image[5:35, 5:35], image[5:35, 45:75] = RED, BLUE
    return image


LEFT_BOX, RIGHT_BOX = (5, 5, 35, 35), (45, 5, 75, 35)


# ---- rules, one test per tag -------------------------------------------------------------------


def test_single_object_needs_a_detection_above_the_threshold() -> None:
    row = meta("single_object", clause("bowl"))
    assert judge(row, [det("bowl", (0, 0, 9, 9), 0.31)]).strict
    assert not judge(row, [det("bowl", (0, 0, 9, 9), 0.3)]).strict  # GenEval keeps score > 0.3
    result = judge(row, [det("cup", (0, 0, 9, 9))])
    assert (result.accuracy, result.reasons) == (0.0, ("expected bowl>=1, found 0",))


def test_two_object_scores_the_fraction_found() -> None:
    row = meta("two_object", clause("bowl"), clause("skis"))
    assert judge(row, [det("bowl", (0, 0, 9, 9)), det("skis", (20, 0, 29, 9))]).accuracy == 1.0
    result = judge(row, [det("skis", (20, 0, 29, 9))])
    assert (result.accuracy, result.strict) == (0.5, False)


def test_counting_is_exact_through_exclude_and_uses_the_counting_threshold() -> None:
    row = meta("counting", clause("wine glass", 2), exclude=(clause("wine glass", 3),))
    two = [det("wine glass", (0, 0, 9, 9)), det("wine glass", (20, 0, 29, 9))]
    assert judge(row, two).strict
    # A third glass at 0.5 passes 0.3 but not the counting threshold 0.9: still two.
    assert judge(row, [*two, det("wine glass", (40, 0, 49, 9), 0.5)]).strict
    three = judge(row, [*two, det("wine glass", (40, 0, 49, 9), 0.92)])
    assert (three.accuracy, three.reasons) == (0.5, ("expected wine glass<3, found 3",))
    assert judge(row, two[:1]).accuracy == 0.5  # include fails, exclude holds


def test_colors_checks_the_colour_of_the_counted_objects() -> None:
    row = meta("colors", clause("cup", color="red"))
    colors = partial(PixelColorClassifier(), two_patches())
    assert judge(row, [det("cup", LEFT_BOX)], colors).strict
    blue = judge(row, [det("cup", RIGHT_BOX)], colors)
    assert (blue.accuracy, blue.reasons) == (0.5, ("expected red cup>=1, found 0 (blue)",))
    assert judge(row, [], colors).accuracy == 0.0  # no cup: its colour fails too


def test_color_attr_scores_each_object_and_its_colour() -> None:
    row = meta("color_attr", clause("handbag", color="red"), clause("scissors", color="blue"))
    colors = partial(PixelColorClassifier(), two_patches())
    right = [det("handbag", LEFT_BOX), det("scissors", RIGHT_BOX)]
    assert judge(row, right, colors).strict
    swapped = [det("handbag", RIGHT_BOX), det("scissors", LEFT_BOX)]
    assert judge(row, swapped, colors).accuracy == 0.5  # both found, both colours wrong
    assert judge(row, right[:1], colors).accuracy == 0.5  # handbag right, scissors missing


def test_position_relation_threshold_and_missing_target() -> None:
    row = meta("position", clause("laptop"), clause("cow", position=["right of", 0]))
    laptop, cow = det("laptop", (0, 40, 20, 60)), det("cow", (80, 40, 100, 60))  # centres x 10, 90
    assert judge(row, [laptop, cow]).strict
    wrong_side = judge(row, [det("laptop", cow.box), det("cow", laptop.box)])
    assert (wrong_side.accuracy, wrong_side.reasons) == (2 / 3, ("expected cow right of laptop",))
    # Centres 10 px apart, widths 60: the offset shrinks by 0.1 * 120 = 12 to 0, no relation.
    close = [det("laptop", (15, 40, 75, 60)), det("cow", (25, 40, 85, 60))]
    assert judge(row, close).accuracy == 2 / 3
    # No laptop: its include fails, and so does the cow's position (no target).
    assert judge(row, [cow]).accuracy == 1 / 3


def test_relative_position_hand_computed() -> None:
    a, b = det("cat", (0, 0, 2, 2)), det("dog", (10, 10, 12, 12))
    # offset (-10, -10), shrunk by 0.1 * (2 + 2) to (-9.6, -9.6); / |offset| = -0.679 < -0.5.
    assert relative_position(a, b, 0.1) == {"left of", "above"}
    assert relative_position(b, a, 0.1) == {"right of", "below"}
    # offset (-2, -80), sizes 40: x shrinks to 0, y to -76; dy = -76 / 80.02 = -0.95.
    above = relative_position(det("cat", (40, 0, 60, 20)), det("dog", (42, 80, 62, 100)), 0.1)
    assert above == {"above"}
    assert relative_position(a, a, 0.1) == set()


def test_select_objects_caps_sorts_and_applies_nms() -> None:
    boxes = [(0, 0, 9, 9), (5, 0, 14, 9), (30, 0, 39, 9)]
    dets = [det("cup", box, score) for box, score in zip(boxes, [0.5, 0.8, 0.4])]
    kept = select_objects(dets, "two_object", Thresholds())["cup"]
    assert [d.score for d in kept] == [0.8, 0.5, 0.4]
    assert len(select_objects(dets, "two_object", Thresholds(max_objects=2))["cup"]) == 2
    # Inclusive-pixel IoU of the first two: 50 / (100 + 100 - 50) = 1/3.
    assert box_iou(boxes[0], boxes[1]) == pytest.approx(1 / 3)
    kept = select_objects(dets, "two_object", Thresholds(nms_iou=0.3))["cup"]
    assert [d.score for d in kept] == [0.8, 0.4]
    assert select_objects(dets, "counting", Thresholds()) == {}


def test_exclude_fails_when_the_class_is_present() -> None:
    row = meta("single_object", clause("bowl"), exclude=(clause("cup"),))
    assert judge(row, [det("bowl", (0, 0, 9, 9))]).strict
    assert judge(row, [det("bowl", (0, 0, 9, 9)), det("cup", (20, 0, 29, 9))]).accuracy == 0.5


def test_bad_metadata_names_the_prompt_and_field() -> None:
    with pytest.raises(ValueError, match="'a dragon'.*'dragon' is not a GenEval class"):
        parse_spec(meta("single_object", clause("dragon")), "a dragon")
    with pytest.raises(ValueError, match=r"include\[0\]: 'position'"):
        parse_spec(meta("position", clause("cat", position=["above", 0])), "p")
    with pytest.raises(ValueError, match="'count' must be an integer"):
        parse_spec(meta("counting", clause("cat", 0)), "p")
    with pytest.raises(ValueError, match="'tag' 'shapes' is not one of"):
        parse_spec(meta("shapes", clause("cat")), "p")
    with pytest.raises(ValueError, match="'p' has no GenEval metadata"):
        parse_spec(None, "p")


@needs_shared
def test_every_shared_metadata_row_parses() -> None:
    path = SHARED_DATA / "prompts" / "geneval_test_metadata.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    specs = [parse_spec(row, row["prompt"]) for row in rows]
    assert {spec.tag for spec in specs} == set(TAGS)
    assert len(CLASSES) == 80 and {inc.cls for s in specs for inc in s.include} <= set(CLASSES)


def test_summarize_is_strict_accuracy_per_tag_and_their_mean() -> None:
    def result(tag: str, strict: bool) -> GenEvalResult:
        return GenEvalResult("p", tag, RuleResult(int(strict), 1, ()), {})

    results = [result("counting", True), result("counting", False), result("colors", True)]
    assert summarize(results) == {"counting": 0.5, "colors": 1.0, "overall": 0.75}


def test_pixel_colours_of_named_colours() -> None:
    named = {
        "red": [(255, 0, 0), (178, 34, 34), (139, 0, 0)],
        "orange": [(255, 165, 0), (255, 127, 80)],
        "yellow": [(255, 255, 0), (240, 230, 140)],
        "green": [(0, 128, 0), (144, 238, 144)],
        "blue": [(0, 0, 255), (135, 206, 235), (0, 255, 255)],
        "purple": [(128, 0, 128), (75, 0, 130)],
        "pink": [(255, 192, 203), (255, 20, 147)],
        "brown": [(139, 69, 19), (101, 67, 33)],
        "black": [(0, 0, 0), (100, 100, 100)],
        "white": [(255, 255, 255), (180, 180, 180)],
    }
    for name, rgbs in named.items():
        found = [COLORS[i] for i in pixel_colors(np.array(rgbs, np.uint8))]
        assert found == [name] * len(rgbs), (name, found)


def test_pixel_classifier_uses_the_mask_when_there_is_one() -> None:
    mask = np.zeros((40, 80), bool)
    mask[5:35, 45:75] = True  # the blue square, inside a box covering both
    whole = Detection("cup", 0.9, (0, 0, 80, 40), mask)
    assert PixelColorClassifier()(two_patches(), "cup", [whole]) == ["blue"]


# ---- Flow-GRPO's partial credit (reward_mode "flow_grpo") ---------------------------------------


def glasses(n: int, score: float = 0.95) -> list[Detection]:
    return [det("wine glass", (20 * i, 0, 20 * i + 9, 9), score) for i in range(n)]


def test_count_credit_hand_computed() -> None:
    assert count_credit(2, 2) == 1.0
    assert count_credit(2, 3) == 0.5 and count_credit(2, 1) == 0.5
    assert count_credit(4, 1) == 0.25
    assert count_credit(1, 3) == -1.0  # 1 - |1 - 3| / 1: below 0 past twice the count


def test_partial_counting_is_exact_over_all_kept_objects() -> None:
    row = meta("counting", clause("wine glass", 2), exclude=(clause("wine glass", 3),))
    assert credit(row, glasses(2)) == PartialCredit((1.0,), True, ())
    three = credit(row, glasses(3))  # 1 - |2 - 3| / 2; GenEval: include met, exclude failed
    assert (three.credits, three.strict) == ((0.5,), False)
    assert three.reasons == ("expected wine glass==2, found 3",)
    assert credit(row, glasses(5)).score == -0.5  # 1 - 3 / 2
    assert credit(row, glasses(1)).score == 0.5
    # Glasses at 0.5 fall below the counting threshold 0.9, as in GenEval.
    assert credit(row, glasses(2) + glasses(2, 0.5)).score == 1.0


def test_partial_ignores_exclude_and_punishes_extra_objects() -> None:
    bowl, cup = det("bowl", (0, 0, 9, 9)), det("cup", (20, 0, 29, 9))
    row = meta("single_object", clause("bowl"), exclude=(clause("cup"),))
    assert credit(row, [bowl, cup]) == PartialCredit((1.0,), True, ())
    assert judge(row, [bowl, cup]).accuracy == 0.5  # GenEval counts the exclude clause
    three = [bowl, det("bowl", (40, 0, 49, 9)), det("bowl", (60, 0, 69, 9))]
    assert credit(meta("single_object", clause("bowl")), three).score == -1.0  # 1 - 2 / 1
    two = meta("two_object", clause("bowl"), clause("skis"))
    assert credit(two, [bowl]).credits == (1.0, 0.0)


def test_partial_colours_of_the_counted_objects() -> None:
    row = meta("colors", clause("cup", color="red"))
    colors = partial(PixelColorClassifier(), two_patches())
    assert credit(row, [det("cup", LEFT_BOX)], colors).credits == (1.0, 1.0)
    blue = credit(row, [det("cup", RIGHT_BOX)], colors)
    assert (blue.credits, blue.strict) == ((1.0, 0.0), False)
    assert credit(row, [], colors).credits == (0.0, 0.0)  # no cup: the colour scores 0 unseen
    # Two cups for one: 1 - |1 - 2| / 1 = 0 and the colour 0, though the best cup is red.
    both = [det("cup", LEFT_BOX, 0.9), det("cup", RIGHT_BOX, 0.8)]
    assert credit(row, both, colors).credits == (0.0, 0.0)
    assert judge(row, both, colors).strict  # GenEval checks the most confident cup only


def test_partial_color_attr() -> None:
    row = meta("color_attr", clause("handbag", color="red"), clause("scissors", color="blue"))
    colors = partial(PixelColorClassifier(), two_patches())
    right = [det("handbag", LEFT_BOX), det("scissors", RIGHT_BOX)]
    assert credit(row, right, colors).credits == (1.0, 1.0, 1.0, 1.0)
    swapped = [det("handbag", RIGHT_BOX), det("scissors", LEFT_BOX)]
    assert credit(row, swapped, colors).credits == (1.0, 0.0, 1.0, 0.0)
    assert credit(row, right[:1], colors).credits == (1.0, 1.0, 0.0, 0.0)


def test_partial_position_credits_a_failed_relation_0_and_1() -> None:
    row = meta("position", clause("laptop"), clause("cow", position=["right of", 0]))
    laptop, cow = det("laptop", (0, 40, 20, 60)), det("cow", (80, 40, 100, 60))
    assert credit(row, [laptop, cow]) == PartialCredit((1.0, 1.0, 1.0), True, ())
    # Wrong side: the server appends 0 for the relation, then 1 after its loop: 3 / 4.
    wrong = credit(row, [det("laptop", cow.box), det("cow", laptop.box)])
    assert (wrong.credits, wrong.score, wrong.strict) == ((1.0, 1.0, 0.0, 1.0), 0.75, False)
    assert judge(row, [det("laptop", cow.box), det("cow", laptop.box)]).accuracy == 2 / 3
    # No laptop: its clause 0; the cow is counted (1), its target failed (0).
    alone = credit(row, [cow])
    assert (
        alone.credits == (0.0, 1.0, 0.0) and alone.reasons[-1] == "no target for cow to be right of"
    )
    # Two cows for one: 1 - 1 / 1 = 0, and 0 for the relation, not checked.
    cows = [cow, det("cow", (80, 0, 100, 20))]
    assert credit(row, [laptop, *cows]).credits == (1.0, 0.0, 0.0)


def test_colour_calls_are_shared_between_the_rule_sets() -> None:
    calls = []

    def classify(image: np.ndarray, cls: str, objects) -> list[str]:
        calls.append((cls, len(objects)))
        return ["red"] * len(objects)

    colors = memoized_colors(two_patches(), classify)
    cups = [det("cup", LEFT_BOX)]
    assert colors("cup", cups) == ["red"] and colors("cup", list(cups)) == ["red"]
    assert colors("cup", [det("cup", RIGHT_BOX)]) == ["red"]  # other objects: asked again
    assert calls == [("cup", 1), ("cup", 1)]


# ---- the yolov3-tiny backend and the whole reward ----------------------------------------------


@pytest.fixture(scope="module")
def yolo_reward() -> GenEvalReward:
    return rewards.load("geneval")


@needs_shared
def test_yolo_finds_the_stop_sign(yolo_reward: GenEvalReward) -> None:
    image = np.asarray(Image.open(STOP_IMAGE).convert("RGB"))
    blank = np.full((64, 96, 3), 255, np.uint8)
    found, nothing = yolo_reward.detector.detect([image, blank])
    signs = [d for d in found if d.label == "stop sign" and d.score > 0.9]
    # yolov3-tiny finds only the sign here (the giraffe stays below its threshold).
    assert len(signs) == 1 and {d.label for d in found} == {"stop sign"}
    x0, y0, x1, y1 = signs[0].box  # the sign spans about x 310-580, y 140-450 of 590 x 591
    assert 270 < x0 < 340 and 550 < x1 <= 590 and 110 < y0 < 170 and 420 < y1 < 480
    assert nothing == []
    assert yolo_reward.detector.detect([image])[0] == found  # batching changes nothing


@needs_shared
def test_geneval_reward_scores_real_detections(yolo_reward: GenEvalReward) -> None:
    rows = [
        meta("single_object", clause("stop sign")),
        meta("colors", clause("stop sign", color="red")),
        meta("colors", clause("stop sign", color="green")),
        meta("two_object", clause("stop sign"), clause("bus")),
    ]
    images, prompts = [Image.open(STOP_IMAGE)] * 4, [row["prompt"] for row in rows]
    out = yolo_reward.score(images, prompts, rows)
    np.testing.assert_array_equal(out.scores, [1.0, 1.0, 0.5, 0.5])
    np.testing.assert_array_equal(out.components["geneval_strict"], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(yolo_reward.score(images, prompts, rows).scores, out.scores)
    with pytest.raises(ValueError, match="'a stop sign' has no GenEval metadata"):
        yolo_reward.score(images[:1], ["a stop sign"])
    # Flow-GRPO's partial credit on the same single sign: the green sign 1 and 0, the missing bus
    # 1 - |1 - 0| / 1 = 0; GenEval's components stay as they were.
    flow = rewards.load("geneval", reward_mode="flow_grpo").score(images, prompts, rows)
    np.testing.assert_array_equal(flow.scores, [1.0, 1.0, 0.5, 0.5])
    np.testing.assert_array_equal(flow.components["geneval_partial"], flow.scores)
    np.testing.assert_array_equal(flow.components["geneval_exact"], [1.0, 1.0, 0.0, 0.0])
    for name in ("geneval_accuracy", "geneval_strict"):
        np.testing.assert_array_equal(flow.components[name], out.components[name])
    assert set(out.components) == {"geneval_accuracy", "geneval_strict"}


def test_geneval_options_are_checked() -> None:
    with pytest.raises(ValueError, match="detector must be one of"):
        rewards.load("geneval", detector="detr")
    with pytest.raises(ValueError, match="reward_mode must be one of"):
        rewards.load("geneval", reward_mode="partial")
    with pytest.raises(ValueError, match="unknown option"):
        rewards.load("geneval", threshold=0.5)
    with pytest.raises(MissingCheckpointError, match="clip_checkpoint.*timm/vit_large_patch14"):
        rewards.load("geneval", clip_checkpoint="/nonexistent/open_clip_pytorch_model.bin")
    with pytest.raises(MissingCheckpointError, match="yolo_weights"):
        YoloDetector(weights_path="/nonexistent/yolov3-tiny.weights")


# ---- CLIP colours on a tiny open_clip model ----------------------------------------------------


def test_clip_colours_load_the_open_clip_file(tmp_path: Path) -> None:
    import open_clip
    import torch

    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}
    name = "soar-test-geneval-tiny-clip"
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(name, force_quick_gelu=True)
    checkpoint = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), checkpoint)

    reward = rewards.load("geneval", clip_checkpoint=str(checkpoint), clip_model_name=name)
    loaded = reward.colors.model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded[key].cpu(), value)
    objects = [
        Detection("cup", 0.9, LEFT_BOX),
        Detection("cup", 0.9, (0, 0, 80, 40), np.ones((40, 80), bool)),
    ]
    colors = reward.colors(two_patches(), "cup", objects)
    assert len(colors) == 2 and set(colors) <= set(COLORS)
    assert reward.colors(two_patches(), "cup", objects) == colors  # deterministic


# ---- the mmdet backend (needs rewards/geneval/install_mmdet.sh) --------------------------------


@pytest.mark.mmdet
@pytest.mark.skipif(
    importlib.util.find_spec("mmdet") is None,
    reason="mmdet/mmcv not installed: bash rewards/geneval/install_mmdet.sh (see INSTALL.md)",
)
def test_mmdet_mask2former_random_weights(tmp_path: Path) -> None:
    import torch
    from mmdet.apis import init_detector

    from rewards.geneval.detectors import default_mask2former_config

    torch.manual_seed(0)
    model = init_detector(str(default_mask2former_config()), None, device="cpu")
    checkpoint = tmp_path / "mask2former_swin-s.pth"
    meta_data = {"dataset_meta": model.dataset_meta}
    torch.save({"state_dict": model.state_dict(), "meta": meta_data}, checkpoint)
    reward = rewards.load(
        "geneval", detector="mmdet", mmdet_checkpoint=str(checkpoint), device="cpu"
    )
    (detections,) = reward.detector.detect([two_patches()])
    assert detections and all(d.label in CLASSES and d.mask.shape == (40, 80) for d in detections)
    row = meta("single_object", clause("cup"))
    out = reward.score([two_patches()], [row["prompt"]], [row])
    assert out.scores.shape == (1,) and np.isfinite(out.scores).all()
    # The transformer weights under other names, as in an mmdet 2 file: mmengine would only warn.
    renamed = {key.replace(".cross_attn.", ".attentions.1."): value
               for key, value in model.state_dict().items()}  # fmt: skip
    legacy = tmp_path / "mask2former_mmdet2.pth"
    torch.save({"state_dict": renamed, "meta": meta_data}, legacy)
    with pytest.raises(ValueError, match="lacks .* weights.*c9d0c4f2"):
        rewards.load("geneval", detector="mmdet", mmdet_checkpoint=str(legacy), device="cpu")


def test_missing_weights_lists_what_the_checkpoint_lacks() -> None:
    model = {"backbone.w": 1, "head.cross_attn.w": 2, "head.ffn.w": 3}
    saved = {"backbone.w": 1, "head.attentions.1.w": 2, "head.ffn.w": 3, "extra": 4}
    assert missing_weights(model, saved) == ["head.cross_attn.w"]
    assert missing_weights(model, {**saved, "head.cross_attn.w": 2}) == []

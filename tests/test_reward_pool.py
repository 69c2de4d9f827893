"""Reward scoring: the bad-score policy of RewardScorer, reassembly of chunks, and the Ray reward
pool on real OCR and GenEval (yolo) actors: asynchronous submit, a killed actor, errors, drops,
and the `soar_ray_reward_` gauges on the metrics endpoint."""

import time
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image, ImageDraw, ImageFont

from rewards.base import RewardOutput
from soar_ray.cluster.rewards import PoolOutput, RewardPool, ScoringCall, combine, gauge_name
from soar_ray.config import (
    ClusterConfig,
    JobConfig,
    RewardActorsConfig,
    RewardConfig,
    SoarStage,
)
from soar_ray.workers.scorer import RewardScoreError, RewardScorer, ScoredChunk, reward_options

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
STOP_SIGN = {"tag": "single_object", "include": [{"class": "stop sign", "count": 1}]}


class ScriptedReward:
    """Score = the prompt's length; 'nan' in a prompt scores NaN, 'boom' raises, and a batch
    larger than `max_batch` raises (a failure no single sample has)."""

    name = "scripted"

    def __init__(self, max_batch: int = 100) -> None:
        self.max_batch = max_batch

    def score(self, images, prompts, metadata=None) -> RewardOutput:
        if len(prompts) > self.max_batch:
            raise MemoryError(f"{len(prompts)} images do not fit")
        for prompt in prompts:
            if "boom" in prompt:
                raise ValueError(f"cannot score {prompt!r}")
        scores = np.array([np.nan if "nan" in p else float(len(p)) for p in prompts])
        return RewardOutput(scores, {"half": scores / 2})


def scripted(policy: str = "error", max_batch: int = 100) -> RewardScorer:
    config = RewardConfig(on_bad_score=policy)
    return RewardScorer("scripted", config, reward=ScriptedReward(max_batch))


def blanks(n: int) -> list[np.ndarray]:
    return [np.zeros((4, 4, 3), np.uint8)] * n


def test_scorer_errors_name_the_reward_and_the_prompt() -> None:
    with pytest.raises(RewardScoreError, match=r"'scripted' gave the non-finite score nan on "
                       r"prompt 'a nan here' \(image 1 of 2\)"):  # fmt: skip
        scripted().score(blanks(2), ["ok", "a nan here"])
    with pytest.raises(RewardScoreError, match=r"'scripted' raised ValueError: cannot score "
                       r"'boom!' on prompt 'boom!' \(image 2 of 3\)"):  # fmt: skip
        scripted().score(blanks(3), ["ab", "abc", "boom!"])
    with pytest.raises(RewardScoreError, match=r"batch of 3 prompts \(first: 'ab'\) that each "
                       r"score alone: 3 images do not fit"):  # fmt: skip
        scripted(max_batch=2).score(blanks(3), ["ab", "abc", "abcd"])


def test_scorer_drop_policy_keeps_the_rest_and_lists_the_dropped() -> None:
    out = scripted("drop").score(blanks(4), ["ab", "boom", "nan", "abcd"])
    np.testing.assert_array_equal(out.scores, [2.0, np.nan, np.nan, 4.0])
    np.testing.assert_array_equal(out.components["half"], [1.0, np.nan, np.nan, 2.0])
    assert out.dropped.tolist() == [1, 2] and out.seconds > 0
    # A batch that fails as a whole is scored sample by sample: nothing is lost.
    out = scripted("drop", max_batch=2).score(blanks(3), ["ab", "abc", "abcd"])
    assert out.scores.tolist() == [2.0, 3.0, 4.0] and out.dropped.tolist() == []


def test_reward_options_refuse_device_and_batch_size_twice() -> None:
    config = RewardConfig(options={"min_text_score": 0.4}, batch_size=3, device="cpu")
    assert reward_options("ocr", config) == {"min_text_score": 0.4, "device": "cpu",
                                             "batch_size": 3}  # fmt: skip
    with pytest.raises(ValueError, match=r"rewards.ocr.options.device: set rewards.ocr.device"):
        reward_options("ocr", RewardConfig(options={"device": "cuda"}))


def test_combine_weights_rewards_and_keeps_every_component() -> None:
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([10.0, 20.0, 30.0, 40.0, np.nan])
    chunks = [
        ScoringCall("a", 0, 0, 3, None),
        ScoringCall("a", 1, 3, 5, None),
        ScoringCall("b", 0, 0, 5, None),
    ]
    scored = [
        ScoredChunk(a[:3], {"a_extra": -a[:3]}, seconds=0.5),
        ScoredChunk(a[3:], {"a_extra": -a[3:]}, seconds=1.5),
        ScoredChunk(b, dropped=np.array([4]), seconds=1.0),
    ]
    out = combine({"a": 0.5, "b": 2.0}, 5, chunks, scored)
    np.testing.assert_array_equal(out.scores, [20.5, 41.0, 61.5, 82.0, np.nan])
    assert sorted(out.components) == ["a", "a_extra", "b"]
    np.testing.assert_array_equal(out.components["a_extra"], -a)
    assert out.dropped["b"].tolist() == [4] and out.dropped["a"].tolist() == []
    assert out.kept.tolist() == [True] * 4 + [False] and out.num_dropped == 1
    assert out.seconds == {"a": 1.5, "b": 1.0}
    clash = [*scored[:2], ScoredChunk(b, {"a": b})]
    with pytest.raises(ValueError, match="reward 'b': component name 'a' is used twice"):
        combine({"a": 0.5, "b": 2.0}, 5, chunks, clash)


def test_gauge_names_and_stage_without_rewards() -> None:
    assert gauge_name("ocr", "mean") == "soar_ray_reward_ocr_mean"
    assert gauge_name("pick-v1.5", "latency_seconds") == "soar_ray_reward_pick_v1_5_latency_seconds"
    job = JobConfig(name="j", data={"source": "synthetic"}, stages=[SoarStage()])
    assert job.reward_names == [] and RewardPool.for_job(job) is None


# ---- the pool on a real local Ray --------------------------------------------------------------


def rendered(text: str) -> np.ndarray:
    image = Image.new("RGB", (160, 48), "white")
    ImageDraw.Draw(image).text((6, 8), text, fill="black", font=ImageFont.load_default(size=28))
    return np.asarray(image)


def sample_batch() -> tuple[list[np.ndarray], list[str], list[dict]]:
    """Rendered words (OCR scores 1, partial and 0) and, when present, a real stop sign."""
    words = ["SOAR", "RAY", "FLOW", "GRPO", "", "SOAR"]
    targets = ["SOAR", "RAY", "FLOWS", "GRPO", "TEXT", "XYZ"]
    images = [rendered(word) for word in words]
    if SHARED_IMAGES.is_dir():
        stop = Image.open(SHARED_IMAGES / "giraffe_and_stop_sign.png").convert("RGB")
        images.append(np.asarray(stop.resize((256, 256))))
        targets.append("STOP")
    prompts = [f'a stop sign that says "{target}"' for target in targets]
    return images, prompts, [{**STOP_SIGN, "prompt": p} for p in prompts]


# One onnxruntime thread per OCR model: the test process and the actors share two cores.
OCR = RewardConfig(options={"num_threads": 1}, batch_size=2, device="cpu", on_bad_score="drop")
GENEVAL = RewardConfig(batch_size=3, device="cpu")


@pytest.fixture(scope="module")
def want() -> dict[str, np.ndarray]:
    """Scores of the sample batch by the rewards called directly: what the pool must give."""
    images, prompts, rows = sample_batch()
    scorers = {"ocr": RewardScorer("ocr", OCR), "geneval": RewardScorer("geneval", GENEVAL)}
    return {name: scorer.score(images, prompts, rows).scores for name, scorer in scorers.items()}


@pytest.fixture(scope="module")
def pool(ray_local) -> RewardPool:
    actors = RewardActorsConfig(num_actors=2, num_cpus=0.25)
    cluster = ClusterConfig(
        reward_actors={"ocr": actors, "geneval": actors.model_copy(update={"num_actors": 1})},
        max_actor_restarts=2,
        max_task_retries=2,
    )
    with RewardPool(
        {"ocr": 1.0, "geneval": 0.5}, {"ocr": OCR, "geneval": GENEVAL}, cluster
    ) as pool:
        yield pool


def check_output(out: PoolOutput, want: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(out.components["ocr"], want["ocr"])
    np.testing.assert_array_equal(out.components["geneval"], want["geneval"])
    np.testing.assert_allclose(out.scores, want["ocr"] + 0.5 * want["geneval"])
    assert {"ocr_exact", "geneval_accuracy", "geneval_strict"} <= out.components.keys()


def test_submit_returns_at_once_and_batches_overlap(pool, want) -> None:
    images, prompts, rows = sample_batch()
    named = [ray.get_actor(f"reward-ocr-{i}").pid.remote() for i in range(2)]
    assert ray.get(named) == ray.get([actor.pid.remote() for actor in pool.actors["ocr"]])
    first = pool.submit(images, prompts, rows)
    assert not first.done()  # scoring takes seconds; submit waited for none of them
    second = pool.submit(images[::-1], prompts[::-1], rows[::-1])  # queued while first scores
    out_second, out_first = second.result(timeout=120), first.result(timeout=120)
    assert want["ocr"][:3].tolist() == [1.0, 1.0, 0.8]  # the batch spans full and partial reads
    check_output(out_first, want)
    check_output(out_second, {name: scores[::-1] for name, scores in want.items()})
    assert out_first.num_dropped == 0 and first.done()


def test_images_by_object_ref_and_weights_per_submit(pool, want) -> None:
    images, prompts, rows = sample_batch()
    ref = ray.put(images)  # as a rollout worker returns them: the driver never holds the pixels
    out = pool.submit(ref, prompts, rows, weights={"ocr": 2.0}).result(timeout=120)
    np.testing.assert_array_equal(out.scores, 2.0 * want["ocr"])
    assert "geneval" not in out.components and "ocr_exact" in out.components
    with pytest.raises(ValueError, match=r"no actors for rewards \['pickscore'\]"):
        pool.submit(ref, prompts, rows, weights={"pickscore": 1.0})


def test_a_killed_actor_loses_no_batch(pool, want) -> None:
    images, prompts, rows = sample_batch()
    victim = pool.actors["ocr"][0]
    pid = ray.get(victim.pid.remote())
    handle = pool.submit(images * 8, prompts * 8, rows * 8)  # 12 or more calls an OCR actor
    calls = [c.ref for c in handle.calls if c.reward == "ocr" and c.actor == 0]
    ray.wait(calls, num_returns=1, timeout=60)  # the victim is at work
    finished, _ = ray.wait(calls, num_returns=len(calls), timeout=0)
    assert len(finished) < len(calls)
    ray.kill(victim, no_restart=False)  # the actor dies mid-batch; Ray restarts it
    out = handle.result(timeout=180)
    check_output(out, {name: np.tile(scores, 8) for name, scores in want.items()})
    assert ray.get(victim.pid.remote()) != pid


def test_an_error_names_the_reward_and_the_prompt(pool) -> None:
    images, prompts, rows = sample_batch()
    rows[2] = None  # geneval (on_bad_score: error) needs every prompt's GenEval row
    with pytest.raises(RewardScoreError, match=r"reward 'geneval' raised ValueError: .* on prompt "
                       r"'a stop sign that says \"FLOWS\"'"):  # fmt: skip
        pool.submit(images, prompts, rows).result(timeout=120)


def test_drop_policy_counts_and_gauges_reach_the_endpoint(pool, ray_local, soar_metrics) -> None:
    images, prompts, rows = sample_batch()
    prompts[1] = "a sign with no quoted text"  # ocr (on_bad_score: drop) cannot find a target
    out = pool.submit(images, prompts, rows).result(timeout=120)
    assert out.dropped["ocr"].tolist() == [1] and out.dropped["geneval"].tolist() == []
    assert out.num_dropped == 1 and np.isnan(out.scores[1])
    assert np.isfinite(np.delete(out.scores, 1)).all()
    ocr = out.components["ocr"][out.kept]
    want_gauges = {
        gauge_name("ocr", "mean"): pytest.approx(ocr.mean()),
        gauge_name("ocr", "std"): pytest.approx(ocr.std()),
        gauge_name("ocr", "latency_seconds"): pytest.approx(out.seconds["ocr"]),
        gauge_name("geneval", "mean"): pytest.approx(out.components["geneval"][out.kept].mean()),
    }
    deadline, seen = time.monotonic() + 15, {}
    while seen != want_gauges:
        assert time.monotonic() < deadline, f"gauges on the endpoint: {seen}"
        time.sleep(0.5)
        metrics = soar_metrics(ray_local.metrics_url)
        seen = {name: metrics.get((name, None, None)) for name in want_gauges}
    assert (gauge_name("geneval", "std"), None, None) in metrics


def test_an_actor_that_cannot_load_its_model_fails_the_pool(ray_local) -> None:
    cluster = ClusterConfig(reward_actors={"ocr": RewardActorsConfig(num_cpus=0.25)})
    bad = RewardConfig(options={"min_text_score": 2.0}, device="cpu")
    with pytest.raises(RuntimeError, match=r"reward 'ocr': a scoring actor failed to start: "
                       r"ValueError: ocr: min_text_score must be in \[0, 1\], got 2.0"):  # fmt: skip
        RewardPool({"ocr": 1.0}, {"ocr": bad}, cluster, actor_prefix="unloadable")

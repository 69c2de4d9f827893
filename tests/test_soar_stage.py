"""The SOAR stage on a real local Ray: DeepSpeed ZeRO learners on gloo, rollout workers, resume."""

import json

import pytest
import ray
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file

from soar_ray.algo.flow import cat_cond, make_schedule
from soar_ray.algo.soar import AuxPoint, SoarInputs, prepare_soar_inputs
from soar_ray.build import build_learner, build_sd3
from soar_ray.cluster.groups import LearnerGroup
from soar_ray.cluster.placement import create_topology
from soar_ray.config import load_job
from soar_ray.stages.pipeline import run_pipeline
from soar_ray.workers.learner import Learner
from soar_ray.workers.soar import soar_hyperparams

pytestmark = pytest.mark.slow

FAST = ["data.synthetic.num_images=32", "logging.progress_bar=false", "logging.tensorboard=false"]


def _job(tmp_path, *overrides):
    return load_job("jobs/tiny.yaml", [f"output_dir={tmp_path}", *FAST, *overrides])


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_job_colocated_trains_and_writes_the_run_folder(ray_local, tmp_path):
    job = _job(tmp_path, "stages.0.num_steps=30", "checkpoint.every=15",
               "logging.sample_every=30", "logging.num_sample_steps=4")  # fmt: skip
    [output] = run_pipeline(job, tmp_path)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"loss", "loss_main", "loss_aux", "samples_per_s", "policy_version"} <= rows[0].keys()
    assert rows[-1]["policy_version"] == 30
    first, last = (sum(r["loss"] for r in part) / 6 for part in (rows[:6], rows[-6:]))
    assert last < 0.9 * first, (first, last)
    assert "checkpoint_seconds" in rows[14] and "checkpoint_seconds" in rows[29]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "0-soar-step-000000.png", "0-soar-step-000030.png"
    ]  # fmt: skip
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00-0000030"
    transformer = SD3Transformer2DModel.from_pretrained(output)
    assert all(torch.isfinite(p).all() for p in transformer.parameters())


def test_disaggregated_rollout_is_stale_by_at_most_max_staleness(ray_local, tmp_path):
    job = _job(tmp_path, "stages.0.num_steps=6", "stages.0.mode=disaggregated",
               "stages.0.max_staleness=1", "logging.sample_every=0")  # fmt: skip
    run_pipeline(job, tmp_path)
    rows = _rows(tmp_path)
    staleness = [r["staleness"] for r in rows]
    # Step 1 is made with the initial weights; after it the workers run one version behind.
    assert staleness == [0, 1, 1, 1, 1, 1]
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["aux_points_per_sample"] == 6.0 for r in rows)


def test_resume_continues_exactly(ray_local, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    lean = ["cluster.num_rollout_workers=0", "logging.sample_every=0"]
    run_pipeline(_job(straight, "stages.0.num_steps=4", "checkpoint.every=4", *lean), straight)
    run_pipeline(_job(split, "stages.0.num_steps=2", "checkpoint.every=2", *lean), split)
    run_pipeline(_job(split, "stages.0.num_steps=4", "checkpoint.every=2", *lean), split)
    weights = "0-soar/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(straight / weights), load_file(split / weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in _rows(split)] == [1, 2, 3, 4]


def _rank_inputs(job, num_ranks, batch_size):
    """Per-rank SoarInputs drawn once here, so every engine trains on the same points."""
    model = build_sd3(job)
    hp = soar_hyperparams(job.stages[0])
    captions = ["a red circle on a blue background", 'a sign that says "SOAR"'] * batch_size
    inputs = []
    for rank in range(num_ranks):
        generator = torch.Generator().manual_seed(100 + rank)
        z0 = torch.randn(batch_size, 16, 8, 8, generator=generator)
        cond = model.encode_prompts(captions[:batch_size])
        inputs.append(prepare_soar_inputs(model.denoise, z0, cond, model.uncond(1),
                                          make_schedule(), hp, generator=generator))  # fmt: skip
    return inputs


def _concat(inputs):
    """One batch holding every rank's samples and points (indices shifted)."""
    points, offset = [], 0
    for part in inputs:
        points += [AuxPoint(p.indices + offset, p.latents, p.sigmas, p.timesteps)
                   for p in part.points]  # fmt: skip
        offset += part.z0.shape[0]
    cat = lambda name: torch.cat([getattr(part, name) for part in inputs])  # noqa: E731
    return SoarInputs(cat("z0"), cat_cond([p.cond for p in inputs]), cat("z1"), cat("t0"),
                      False, points)  # fmt: skip


def _distributed_step(job, inputs):
    topology = create_topology(job.cluster)
    group = LearnerGroup(job, topology)
    try:
        group.call(Learner.setup_stage, 0)
        metrics = group.get(group.scatter(Learner.train, [(x,) for x in inputs]))[0]
        weights = ray.get(group.first(Learner.export_weights))
    finally:
        group.kill()
        topology.remove()
    return metrics, weights


def _reference_step(job, inputs):
    learner = build_learner(job, build_sd3(job), distributed=False)
    learner.setup_stage(0)
    metrics = learner.train(_concat(inputs))
    return metrics, dict(learner.model.transformer.named_parameters())


def _assert_same_weights(weights, reference):
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, reference[name].detach(), rtol=1e-4, atol=1e-6,
                                   msg=name)  # fmt: skip


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_zero_step_matches_the_single_process_reference(ray_local, tmp_path, zero_stage):
    job = _job(tmp_path, f"deepspeed.zero_stage={zero_stage}", "cluster.num_rollout_workers=0")
    inputs = _rank_inputs(job, num_ranks=2, batch_size=2)
    metrics, weights = _distributed_step(job, inputs)
    ref_metrics, reference = _reference_step(job, inputs)
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-4)
    _assert_same_weights(weights, reference)


def test_two_learners_of_b_equal_one_learner_of_2b(ray_local, tmp_path):
    two = _job(tmp_path, "cluster.num_learners=2", "cluster.num_rollout_workers=0")
    one = _job(tmp_path, "cluster.num_learners=1", "cluster.num_rollout_workers=0")
    inputs = _rank_inputs(two, num_ranks=2, batch_size=2)
    metrics_two, weights_two = _distributed_step(two, inputs)
    metrics_one, weights_one = _distributed_step(one, [_concat(inputs)])
    assert metrics_two["loss"] == pytest.approx(metrics_one["loss"], rel=1e-5)
    _assert_same_weights(weights_two, weights_one)

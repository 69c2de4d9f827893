"""The SOAR stage on a real local Ray: DeepSpeed ZeRO learners on gloo, rollout workers (exact resume:
test_checkpoint_integrity.py)."""

import dataclasses
import json
import math
from functools import partial

import psutil
import pytest
import ray
import torch
from diffusers import SD3Transformer2DModel
from helpers import exported_gauges

from soar_ray.algo.flow import cat_cond, make_schedule
from soar_ray.algo.soar import AuxPoint, SoarInputs, prepare_soar_inputs
from soar_ray.build import build_learner, build_sd3
from soar_ray.cluster.groups import LearnerGroup
from soar_ray.cluster.placement import create_topology
from soar_ray.config import load_job
from soar_ray.errors import UnsafeCheckpointError
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
    # The rollout workers' rate, on docker/monitoring's dashboard beside the learners'.
    assert all(r["rollout_samples_per_s"] > 0 for r in rows)
    assert "ray_soar_ray_rollout_samples_per_s" in exported_gauges(rows)


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


def _distributed_step(job, inputs, then=None):
    """The metrics and rank 0's weights of one step of a learner group on per-rank inputs, taken
    after a step every rank must skip (the last rank's latents made NaN), so they equal a fresh
    engine's first step only if the skip left weights, AdamW state and LR schedule untouched.
    `then(group)` runs before the group goes; on the way the rendezvous is checked."""
    topology = create_topology(job.cluster)
    group = LearnerGroup(job, topology)
    try:
        _assert_rendezvous_on_loopback(group)
        group.call(Learner.setup_stage, 0)
        before = ray.get(group.first(Learner.export_weights))
        poisoned = [*inputs[:-1], dataclasses.replace(inputs[-1], z0=inputs[-1].z0 * math.nan)]
        skipped = group.get(group.scatter(Learner.train, [(x,) for x in poisoned]))
        counts = [(m["skipped_steps"], m["skipped_steps_in_a_row"]) for m in skipped]
        assert counts == [(1, 1)] * len(inputs)
        after = ray.get(group.first(Learner.export_weights))
        assert all(torch.equal(before[name], after[name]) for name in before)
        trained = group.get(group.scatter(Learner.train, [(x,) for x in inputs]))
        assert [m["skipped_steps"] for m in trained] == [0] * len(inputs)
        weights = ray.get(group.first(Learner.export_weights))
        if then is not None:
            then(group)
    finally:
        group.kill()
        topology.remove()
    return trained[0], weights


def _assert_rendezvous_on_loopback(group):
    """Rank 0's rendezvous store listens on 127.0.0.1 only (torch's own would take "::", every
    interface, IPv4 too)."""
    host, port = group.rendezvous
    listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}  # fmt: skip
    assert (host, listening) == ("127.0.0.1", {"127.0.0.1"})


def _reload_checkpoint(group, folder, plant):
    """Save the group's checkpoint and load it back (every file weights-only), then load it with
    the last rank's state file planted with code: refused in one line naming that file."""
    group.call(Learner.save_checkpoint, str(folder))
    group.call(Learner.load_checkpoint, str(folder))
    planted = folder / f"rank-{group.world_size - 1:05d}.pt"
    plant(planted, folder / "ran")
    with pytest.raises(UnsafeCheckpointError, match=f"^{planted}: refused to load: it holds "):
        group.call(Learner.load_checkpoint, str(folder))
    assert not (folder / "ran").exists()


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
def test_zero_step_matches_the_single_process_reference(ray_local, tmp_path, zero_stage, plant):
    job = _job(tmp_path, f"deepspeed.zero_stage={zero_stage}", "cluster.num_rollout_workers=0")
    inputs = _rank_inputs(job, num_ranks=2, batch_size=2)
    reload = partial(_reload_checkpoint, folder=tmp_path / "learners", plant=plant)
    metrics, weights = _distributed_step(job, inputs, then=reload)
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


def test_rows_left_out_by_on_bad_sample_skip_are_counted_in_the_metrics(
    ray_local, tmp_path, capsys
):
    from soar_ray.data.synthetic import make_synthetic_set

    data = make_synthetic_set(tmp_path / "data", 8, seed=0, buckets=[(64, 64)])
    with open(data.jsonl_path, "a") as f:
        f.write('{"md5": "gone", "caption_en": "a red circle", "bw": 64, "bh": 64}\n{"md5": \n')
    job = _job(tmp_path / "run", "data.source=jsonl", f"data.jsonl={data.jsonl_path}",
               f"data.image_dir={data.image_dir}", "data.on_bad_sample=skip",
               "stages.0.num_steps=2", "cluster.num_learners=1", "cluster.num_rollout_workers=0",
               "logging.sample_every=0")  # fmt: skip
    run_pipeline(job, tmp_path / "run")
    first, second = _rows(tmp_path / "run")
    assert (first["data_skipped_rows"], first["data_skipped_missing_image"],
            first["data_skipped_malformed_json"]) == (2, 1, 1)  # fmt: skip
    assert "data_skipped_rows" not in second
    assert f"left out 2 rows of {data.jsonl_path} (malformed_json 1, missing_image 1); kept 8" in (
        capsys.readouterr().out
    )

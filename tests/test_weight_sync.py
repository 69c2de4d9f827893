"""Collective weight sync (`cluster.weight_sync: collective`, gloo on CPU): the bucket plan and its
checks in threads of one process; then on the session's Ray, learner rank 0 broadcasts into three
rollout workers, which then hold exactly the learner's weights (live and EMA) at the pushed
version, a worker killed mid-push (and one whose receive broke with it) is restored with that push
and the group rebuilt, and a LoRA stage sends its adapters only; a SOAR -> Flow-GRPO chain on two
ZeRO-3 learners logs the same losses on either backend; and the config field."""

import os
import signal
import threading
import time

import pytest
import ray
import torch

from soar_ray.config import ConfigError, load_job
from soar_ray.errors import RunStopped
from soar_ray.workers.learner import Learner
from soar_ray.workers.weight_transfer import (
    Bucket,
    WeightGroup,
    first_difference,
    listen,
    plan_buckets,
    spec_of,
)

FAST = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.sample_every=0"]


# ---- the bucket plan and a group in threads of this process --------------------------------------


def test_buckets_group_one_dtype_in_order_and_close_at_the_size_limit():
    spec = [("a", (4,), "float32"), ("b", (2, 3), "bfloat16"), ("c", (), "float32"),
            ("d", (10,), "float32"), ("e", (8,), "bfloat16")]  # fmt: skip
    # 24 bytes a bucket: a (16 B) + c (4 B) fit, d (40 B) alone; b (12 B) + e (16 B) do not.
    assert plan_buckets(spec, bucket_bytes=24) == [
        Bucket("float32", (0, 2), 5), Bucket("float32", (3,), 10),
        Bucket("bfloat16", (1,), 6), Bucket("bfloat16", (4,), 8),
    ]  # fmt: skip
    assert plan_buckets(spec) == [Bucket("float32", (0, 2, 3), 15), Bucket("bfloat16", (1, 4), 14)]


def test_first_difference_names_the_first_parameter_that_differs():
    held = [("a", (4,), "float32"), ("b", (2,), "float32")]
    assert first_difference(held, held) is None
    assert first_difference([("a", (4,), "float32"), ("b", (2,), "float64")], held) == (
        "b: sent as [2] float64, held here as [2] float32"
    )
    assert first_difference([("a", (5,), "float32")], held).startswith("a: sent as [5] float32")
    assert first_difference(held[:1], held) == "b: trained here but not sent (1 sent, 2 held)"
    assert first_difference([held[1], held[0]], held) == (
        "b: sent as tensor 0, where this worker trains a"
    )


def _group_in_threads(size):
    """A weight group of `size` members, each in a thread of this process (gloo on 127.0.0.1)."""
    listener = listen("127.0.0.1")
    port, fd = listener.getsockname()[1], listener.detach()
    groups = [None] * size

    def join(rank):
        groups[rank] = WeightGroup.join("127.0.0.1", port, rank, size, torch.device("cpu"),
                                        bind="127.0.0.1", timeout_s=30, op_timeout_s=30,
                                        listen_fd=fd if rank == 0 else None)  # fmt: skip

    _in_threads(join, range(size))
    return groups


def _in_threads(target, args):
    """`target(arg)` for every arg, each in a thread; the first exception of any is raised."""
    errors = []

    def run(arg):
        try:
            target(arg)
        except Exception as exc:  # handed to the test below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(arg,)) for arg in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]


def test_a_push_arrives_whole_and_a_receiver_that_holds_other_dtypes_is_refused():
    generator = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(3, 4, generator=generator),
               "scale": torch.randn((), generator=generator),
               "half": torch.randn(10, generator=generator).bfloat16(),
               "big": torch.randn(40, generator=generator)}  # fmt: skip
    ema = {name: torch.randn(value.shape, generator=generator) for name, value in weights.items()}
    groups = _group_in_threads(3)
    held = [{name: torch.zeros_like(value) for name, value in weights.items()} for _ in range(2)]
    held[1]["half"] = torch.zeros(10, dtype=torch.float16)  # this worker trains another dtype
    results = {}

    def receive(index):
        try:
            results[index] = groups[index + 1].receive(
                held[index], spec_of(list(held[index].items()))
            )
        except ValueError as exc:
            results[index] = exc

    # The fp32 "EMA" values go out in the weights' dtypes; 64-byte buckets: w + scale, big, half.
    push = groups[0].send([(name, w, ema[name]) for name, w in weights.items()], bucket_bytes=64)
    assert [len(b.entries) for b in push.plan] == [2, 1, 1]
    _in_threads(receive, [0, 1])
    push.finish()  # every broadcast completed, the refusing receiver's too
    sent = {name: value.to(weights[name].dtype) for name, value in ema.items()}
    assert results[0] == sum(t.nbytes for t in sent.values()) == push.num_bytes
    assert all(torch.equal(held[0][name], sent[name]) for name in weights)
    assert str(results[1]) == (
        "weight sync: the bucket plans of learner rank 0 and weight group rank 2 differ at "
        "parameter half: sent as [10] bfloat16, held here as [10] float16"
    )
    assert not held[1]["w"].any()  # nothing of a refused push is copied in
    kept = push.weights()
    assert kept.keys() == weights.keys() and all(torch.equal(kept[n], sent[n]) for n in weights)
    for group in groups:
        group.close()


# ---- on the session's Ray ------------------------------------------------------------------------


def _job(tmp_path, *overrides):
    return load_job("jobs/tiny.yaml", [
        f"output_dir={tmp_path}", *FAST, "cluster.weight_sync=collective",
        "cluster.num_learners=1", "deepspeed.enabled=false", "cluster.num_rollout_workers=3",
        "stages=[{algorithm: soar, ema: {enabled: true, every: 1}}, "
        "{algorithm: soar, name: lora, lora: {enabled: true, r: 4, alpha: 4}}]", *overrides,
    ])  # fmt: skip


def _perturb(seed):
    """A learner method moving every trainable weight by seeded noise, then one EMA update, so
    the live weights, their EMA and the workers' copies all differ."""

    def perturb(learner):
        from soar_ray.models import trainable_parameters

        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in trainable_parameters(learner.model.transformer):
                param.add_(torch.randn(param.shape, generator=generator), alpha=0.01)
        if learner.ema is not None:
            learner.ema.after_step(learner.ema.cfg.every)

    return perturb


def _model_bytes():
    """A learner method returning the bytes of every transformer parameter."""

    def model_bytes(learner):
        return sum(p.nbytes for p in learner.model.transformer.parameters())

    return model_bytes


def _nap(index, seconds):
    """A rollout-worker method that sleeps on worker `index` only."""

    def nap(worker):
        if worker.index == index:
            time.sleep(seconds)

    return nap


def _read(names):
    """A rollout-worker method returning its version and the named parameters."""

    def read(worker):
        params = dict(worker.model.transformer.named_parameters())
        return worker.version, {name: params[name].detach().clone() for name in names}

    return read


def _workers_hold(ctx, version, ema=False):
    """Every rollout worker holds learner rank 0's exported weights at `version`, bit for bit."""
    expected = ray.get(ctx.learners.first(Learner.export_weights, ema=ema))
    calls = ctx.rollouts.broadcast(_read(sorted(expected)))
    ctx.rollouts.wait(calls)
    for call in calls:
        held_version, held = ray.get(call.refs[0])
        assert held_version == version
        assert all(torch.equal(held[name], expected[name]) for name in expected)
    return expected


def test_a_group_that_does_not_form_stops_in_one_line_naming_the_way_out():
    """A member whose rank 0 is gone (lost while the group forms: its port closed): RunStopped
    after the timeout, saying what to set."""
    closed = listen("127.0.0.1")
    port = closed.getsockname()[1]
    closed.close()
    start = time.monotonic()
    with pytest.raises(RunStopped) as info:
        WeightGroup.join("127.0.0.1", port, 1, 2, torch.device("cpu"), bind="127.0.0.1",
                         timeout_s=1, op_timeout_s=1)  # fmt: skip
    message = str(info.value)
    assert "did not form for its rank 1 within 1 s" in message and "\n" not in message
    assert "set cluster.weight_sync: object_store" in message
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_collective_pushes_live_ema_and_lora_weights_and_survive_a_worker_killed_mid_push(
    ray_local, tmp_path, capsys
):
    from soar_ray.cluster.weights import CollectiveWeightSync
    from soar_ray.stages.context import StageContext

    ctx = StageContext(_job(tmp_path), tmp_path)
    try:
        assert isinstance(ctx.sync, CollectiveWeightSync)
        assert (
            "weight sync: collective (gloo), learner-0 and 3 rollout workers, rendezvous "
            "at 127.0.0.1:"
        ) in capsys.readouterr().out
        ctx.start_stage(0, handoff=False)
        ctx.learners.call(_perturb(1))
        ctx.sync.push(1)
        ctx.sync.wait()
        live = _workers_hold(ctx, 1)
        ctx.sync.push(2, ema=True)
        ctx.sync.wait()
        ema = _workers_hold(ctx, 2, ema=True)
        assert any(not torch.equal(live[name], ema[name]) for name in live)

        # A worker killed while a push waits for it (it naps in a call queued first): gloo's
        # broadcast tree takes rank 3's buckets through rank 1, so rollout-2's receive breaks too.
        # Both are restored from learner-0's copy of that push; the next push rebuilds the group.
        victim = ray.get_actor("rollout-0")
        pid = ray.get(victim.pid.remote())
        ctx.rollouts.broadcast(_nap(0, seconds=30))
        ctx.learners.call(_perturb(2))
        ctx.sync.push(3)
        time.sleep(1)
        os.kill(pid, signal.SIGKILL)
        ctx.sync.wait()
        assert ray.get(victim.pid.remote()) != pid
        _workers_hold(ctx, 3)
        ctx.learners.call(_perturb(3))
        ctx.sync.push(4)
        ctx.sync.wait()
        out = capsys.readouterr().out
        assert "rollout-0 was lost during RolloutWorker.receive_weights" in out
        assert "rollout-2 was lost during RolloutWorker.receive_weights" in out
        assert "was replaced: learner-0 leaves the collective weight group" in out
        assert out.count("weight sync: collective (gloo)") == 1  # rebuilt once, at push 4
        _workers_hold(ctx, 4)

        # A LoRA stage pushes its adapters only, into the LoRA structure the workers built.
        ctx.finish_stage()
        ctx.start_stage(1, handoff=True)
        ctx.learners.call(_perturb(4))
        ctx.sync.push(5)
        ctx.sync.wait()
        adapters = _workers_hold(ctx, 5)
        sent = ray.get(ctx.learners.first(Learner.pushed_weights))
        assert sent.keys() == adapters.keys() and all(".lora_" in name for name in sent)
        [model_bytes] = ctx.learners.call(_model_bytes())
        assert sum(t.nbytes for t in sent.values()) < 0.1 * model_bytes
    finally:
        ctx.close()


# ---- the config field ----------------------------------------------------------------------------

AUTO = "cluster.weight_sync=auto"
GPUS = ("cluster.gpus_per_learner=1", "deepspeed.precision=bf16")
SHARED = ("cluster.gpus_per_learner=0.5", "cluster.gpus_per_rollout_worker=0.5",
          "cluster.colocate_rollout_with_learners=true", "deepspeed.precision=bf16")  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((*GPUS, "cluster.gpus_per_rollout_worker=1"), "collective"),  # the default: auto
        ((AUTO,), "object_store"),  # tiny.yaml: CPU learners and workers
        ((AUTO, *GPUS, "cluster.gpus_per_rollout_worker=1"), "collective"),
        ((AUTO, *GPUS, "cluster.gpus_per_rollout_worker=0.5"), "object_store"),  # shared GPUs
        ((AUTO, *SHARED), "object_store"),  # on the learners' GPUs
        (("cluster.weight_sync=collective",), "collective"),  # gloo on CPU
        ((*GPUS, "cluster.gpus_per_rollout_worker=1", "cluster.weight_sync=object_store"),
         "object_store"),
    ],
)  # fmt: skip
def test_weight_sync_auto_is_collective_on_gpus_of_their_own(overrides, expected):
    job = load_job("jobs/tiny.yaml", overrides)
    assert job.cluster.weight_sync_backend == expected


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("cluster.weight_sync=nccl",),
         "cluster.weight_sync: must be one of 'auto', 'object_store' or 'collective' (got 'nccl')"),
        (("cluster.weight_sync=collective", *SHARED),
         "cluster.weight_sync: 'collective' on GPUs needs whole GPUs of its own for every "
         "rollout worker"),
        (("cluster.weight_sync=collective", *GPUS, "cluster.gpus_per_rollout_worker=0.5"),
         "set cluster.gpus_per_rollout_worker >= 1"),
    ],
)  # fmt: skip
def test_bad_weight_sync_settings_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_job("jobs/tiny.yaml", overrides)
    assert expected in str(info.value) and len(str(info.value).splitlines()) == 1


# ---- the same run on either backend --------------------------------------------------------------

TRAINED = ("loss", "reward_mean", "policy_loss", "grad_norm", "staleness", "policy_version")


def _trained(run_dir, backend):
    """What the SOAR -> Flow-GRPO chain logs of its training, with the backend given."""
    import json

    from soar_ray.stages.pipeline import run_pipeline

    job = load_job("jobs/tiny_soar_grpo.yaml", [
        f"output_dir={run_dir}", *FAST, f"cluster.weight_sync={backend}", "cluster.num_learners=2",
        "deepspeed.zero_stage=3", "stages.1.ema.enabled=false", "data.synthetic.num_images=16",
        "stages.0.num_steps=3",
        "stages.0.mode=disaggregated", "stages.0.max_staleness=1", "stages.1.num_epochs=2",
        "stages.1.num_inner_epochs=1", "stages.1.eval_every=0", "stages.1.num_groups_per_epoch=2",
        "stages.1.eval_rewards=[]", "stages.1.lora={enabled: true, r: 4, alpha: 4}",
        "cluster.reward_actors={jpeg_compressibility: {num_cpus: 0.25}}",
    ])  # fmt: skip
    run_pipeline(job, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: row[key] for key in TRAINED if key in row} for row in rows]


@pytest.mark.slow
def test_a_soar_then_grpo_run_trains_the_same_on_either_backend(ray_local, tmp_path):
    collective = _trained(tmp_path / "collective", "collective")
    object_store = _trained(tmp_path / "object_store", "object_store")
    assert collective == object_store
    # Disaggregated SOAR one version behind, then on-policy GRPO on LoRA: the rollouts of SOAR's
    # step 3 and GRPO's epochs were made with pushed weights (gathered from two ZeRO-3 learners,
    # sent by rank 0), the GRPO stage's first push being its start (the SOAR output).
    made_with = [row["policy_version"] - 1 - row["staleness"] for row in collective]
    assert made_with == [0, 0, 1, 3, 4]
    assert "reward_mean" in collective[-1] and "loss" in collective[0]

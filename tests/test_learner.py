import copy
import math

import pytest
import torch

from soar_ray.config import ConfigError, EmaConfig, OptimizerConfig, load_job
from soar_ray.workers.engine import LocalEngine, lr_factor
from soar_ray.workers.learner import Ema

JOB = "jobs/tiny.yaml"


def test_lr_factor_constant_and_warmup():
    assert lr_factor(0, OptimizerConfig()) == 1.0
    warm = OptimizerConfig(lr_schedule="warmup", warmup_steps=4)
    assert [lr_factor(s, warm) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_ema_warmup_decay_by_hand():
    p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = Ema([p], EmaConfig(enabled=True, decay=0.9, every=2))
    with torch.no_grad():
        p.fill_(10.0)
    ema.after_step(1)  # not a multiple of `every`: no update
    assert ema.shadow[0].item() == 0.0
    ema.after_step(2)  # n = 0: decay min(1/10, 0.9) = 0.1 -> 0.1 * 0 + 0.9 * 10
    assert ema.shadow[0].item() == pytest.approx(9.0)
    with torch.no_grad():
        p.fill_(20.0)
    ema.after_step(4)  # n = 1: decay 2/11 -> 2/11 * 9 + 9/11 * 20
    assert ema.shadow[0].item() == pytest.approx(2 / 11 * 9 + 9 / 11 * 20)


def test_ema_of_bf16_weights_averages_in_fp32():
    # At decay 0.99 a bf16 average would stay at 1.0: 0.01 x the gap (2^-7) is below half a
    # bf16 step at 1.0 (2^-8).
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.bfloat16))
    ema = Ema([p], EmaConfig(enabled=True, decay=0.99, every=1))
    ema.num_updates = 1000  # past the warm-up: decay min(1001 / 1010, 0.99) = 0.99
    with torch.no_grad():
        p.fill_(1.0078125)  # the next bf16 above 1.0
    ema.after_step(1)
    assert ema.shadow[0].dtype == torch.float32
    assert ema.shadow[0].item() == pytest.approx(0.99 * 1.0 + 0.01 * 1.0078125, abs=1e-7)
    ema.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert ema.shadow[0].dtype == torch.float32


def test_local_engine_updates_fp32_masters_of_bf16_weights(tmp_path):
    # Adam's first steps with a constant gradient move a weight by lr each: 10 steps of 1e-3
    # take the fp32 master from 1.0 to 0.99, and the bf16 weight to its nearest bf16,
    # 0.98828125; bf16 arithmetic alone would round every step back to 1.0.
    cfg = OptimizerConfig(lr=1e-3, weight_decay=0.0, grad_clip=0.0)

    def engine_and_param():
        p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.bfloat16))
        return LocalEngine([p], cfg), p

    engine, p = engine_and_param()
    for _ in range(10):
        p.grad = torch.ones_like(p)
        engine.step()
        assert engine.was_step_applied() and p.grad is None
    assert engine.master[0].dtype == torch.float32 and p.dtype == torch.bfloat16
    assert engine.master[0].item() == pytest.approx(0.99, abs=1e-6)
    assert p.item() == 0.98828125
    engine.save_checkpoint(tmp_path, "tag")
    restored, q = engine_and_param()
    restored.load_checkpoint(tmp_path, "tag")
    assert restored.master[0].item() == engine.master[0].item() and q.item() == 0.98828125


def _linear_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return model, x, y


def test_local_engine_accumulation_equals_one_big_batch():
    cfg = OptimizerConfig(lr=0.1, weight_decay=0.0, grad_clip=0.0)
    big, x, y = _linear_problem()
    engine = LocalEngine(list(big.parameters()), cfg)
    engine.backward(((big(x) - y) ** 2).mean())
    engine.step()

    acc, _, _ = _linear_problem()
    engine = LocalEngine(list(acc.parameters()), cfg, gradient_accumulation_steps=2)
    for half in (slice(0, 4), slice(4, 8)):
        engine.backward(((acc(x[half]) - y[half]) ** 2).mean())
        engine.step()
    assert engine.global_steps == 1 and engine.micro_steps == 2
    for a, b in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b)


def test_local_engine_clips_to_max_norm():
    model, x, y = _linear_problem()
    engine = LocalEngine(list(model.parameters()), OptimizerConfig(lr=1.0, grad_clip=1e-3))
    engine.backward(1e3 * ((model(x) - y) ** 2).mean())
    grads = [p.grad.clone() for p in model.parameters()]
    engine.step()
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    assert engine.get_global_grad_norm() == pytest.approx(norm, rel=1e-5)


def test_local_engine_skips_a_non_finite_step_and_trains_on():
    model, x, y = _linear_problem()
    cfg = OptimizerConfig(lr=0.1, lr_schedule="warmup", warmup_steps=4)
    engine = LocalEngine(list(model.parameters()), cfg)
    engine.backward(((model(x) - y) ** 2).mean())
    engine.step()  # a real step first: AdamW has moments and a step count to keep
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(engine.optimizer.state_dict())
    lr = engine.get_lr()
    engine.backward(math.nan * ((model(x) - y) ** 2).mean())
    engine.step()
    assert not engine.was_step_applied() and math.isnan(engine.get_global_grad_norm())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    after = engine.optimizer.state_dict()
    for key, moments in state["state"].items():
        assert all(torch.equal(v, after["state"][key][k]) for k, v in moments.items())
    assert engine.get_lr() == lr  # the warm-up did not advance
    engine.backward(((model(x) - y) ** 2).mean())
    engine.step()
    assert engine.was_step_applied() and engine.get_lr() != lr
    assert not any(torch.equal(a, b) for a, b in zip(params, model.parameters()))


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("learner")
    return load_job(JOB, [f"output_dir={out}", "data.synthetic.num_images=16"])


def _learner(job, **stage_overrides):
    from soar_ray.build import build_learner, build_sd3

    job = job.model_copy(update={"stages": [job.stages[0].model_copy(update=stage_overrides)]})
    learner = build_learner(job, build_sd3(job), distributed=False)
    learner.setup_stage(0)
    return learner


def _batch(job):
    from soar_ray.build import build_dataset
    from soar_ray.data import collate_samples

    dataset = build_dataset(job)
    return collate_samples([dataset.get(i, 0) for i in range(4)])


def test_soar_step_trains_every_transformer_weight_and_reports(tiny_job):
    learner = _learner(tiny_job)
    before = [p.detach().clone() for p in learner.params]
    metrics = learner.train(_batch(tiny_job))
    assert metrics["aux_points_per_sample"] == 6.0  # M = 1 path, P = 6 points, every sample
    assert all(math.isfinite(metrics[k]) for k in ("loss", "loss_main", "loss_aux", "grad_norm"))
    changed = [not torch.equal(a, p) for a, p in zip(before, learner.params)]
    assert sum(changed) > 0.9 * len(changed)


def test_a_non_finite_loss_skips_the_step_and_leaves_weights_and_ema(tiny_job, tmp_path):
    learner = _learner(tiny_job, ema=EmaConfig(enabled=True, every=1))
    batch = _batch(tiny_job)
    learner.train(batch)  # a real step first: the EMA now lags the weights
    weights = [p.detach().clone() for p in learner.params]
    shadow = [t.clone() for t in learner.ema.shadow]
    num_updates = learner.ema.num_updates
    bad = learner.train(batch | {"pixels": batch["pixels"] * math.nan})
    assert (bad["skipped_steps"], bad["skipped_steps_in_a_row"]) == (1, 1)
    # An overflowed loss whose own gradient is finite is refused just the same.
    learner.backward_step(learner.params[0].sum() + math.inf)
    assert learner.num_skipped_in_a_row == 2
    assert all(torch.equal(a, p) for a, p in zip(weights, learner.params))
    assert all(torch.equal(a, b) for a, b in zip(shadow, learner.ema.shadow))
    assert learner.ema.num_updates == num_updates
    # The streak is part of a checkpoint: a resumed learner counts on from it.
    learner.save_checkpoint(tmp_path)
    resumed = _learner(tiny_job, ema=EmaConfig(enabled=True, every=1))
    resumed.load_checkpoint(tmp_path)
    assert resumed.num_skipped_in_a_row == 2
    assert (
        resumed.train(batch | {"pixels": batch["pixels"] * math.nan})["skipped_steps_in_a_row"] == 3
    )
    good = learner.train(batch)
    assert (good["skipped_steps"], good["skipped_steps_in_a_row"]) == (0, 0)
    assert math.isfinite(good["loss"]) and math.isfinite(good["grad_norm"])
    assert sum(not torch.equal(a, p) for a, p in zip(weights, learner.params)) > 0.9 * len(weights)


def test_lambda_zero_is_sft(tiny_job):
    metrics = _learner(tiny_job, lambda_aux=0.0).train(_batch(tiny_job))
    assert metrics["aux_points_per_sample"] == 0.0
    assert metrics["loss"] == pytest.approx(metrics["loss_main"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "all"),  # colocated on raw images: the learner encodes
        (["data.source=cache", "data.cache_dir=c"], "transformer"),
        (["data.source=cache", "data.cache_dir=c", "cluster.num_rollout_workers=0"], "all"),
        (["stages.0.mode=disaggregated"], "transformer"),  # the rollout workers encode
    ],
)
def test_learners_hold_only_what_they_use(overrides, expected):
    from soar_ray.build import learner_components
    from soar_ray.models import COMPONENTS

    job = load_job(JOB, overrides)
    assert learner_components(job) == (COMPONENTS if expected == "all" else ("transformer",))


def test_sample_prompts_file_replaces_the_list(tmp_path):
    from soar_ray.stages.context import sample_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# sample prompts\na dog on a beach\n\na cat\n")
    job = load_job(JOB, [f"logging.sample_prompts_file={prompts}", "logging.num_sample_prompts=3"])
    assert sample_prompts(job) == ["a dog on a beach", "a cat"]
    default = load_job(JOB)
    assert sample_prompts(default) == default.logging.sample_prompts[:4]


def test_allow_tf32_reaches_torch():
    from soar_ray.build import build_sd3

    try:
        for flag in (False, True):
            build_sd3(load_job(JOB, [f"deepspeed.allow_tf32={flag}"]), components=("transformer",))
            assert torch.backends.cuda.matmul.allow_tf32 is flag
            assert torch.backends.cudnn.allow_tf32 is flag
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize(("value", "recompute"), [("true", [True, True]), ("1", [True, False]),
                                                  ("false", [False, False])])  # fmt: skip
def test_activation_checkpointing_setting_reaches_the_blocks(tiny_job, value, recompute):
    job = tiny_job.model_copy(update={"deepspeed": load_job(
        JOB, [f"deepspeed.activation_checkpointing={value}"]).deepspeed})  # fmt: skip
    learner = _learner(job)
    blocks = learner.model.transformer.transformer_blocks
    assert [block.soar_recompute for block in blocks] == recompute
    assert learner.model.transformer.gradient_checkpointing == any(recompute)
    assert math.isfinite(learner.train(_batch(job))["loss"])


def test_activation_checkpointing_refuses_a_negative_block_count():
    with pytest.raises(ConfigError, match="deepspeed.activation_checkpointing"):
        load_job(JOB, ["deepspeed.activation_checkpointing=-1"])


def test_compiled_blocks_refuse_zero3():
    with pytest.raises(
        ConfigError, match="deepspeed.compile_blocks: not with deepspeed.zero_stage 3"
    ):
        load_job(JOB, ["deepspeed.compile_blocks=true", "deepspeed.zero_stage=3"])

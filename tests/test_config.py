"""Job schema: job files load, defaults are the SPEC's, overrides, errors name file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from soar_ray.config import (
    ConfigError,
    GrpoStage,
    JobConfig,
    SoarStage,
    dump_config,
    load_job,
    models_in_annotation,
)

JOBS = Path(__file__).resolve().parents[1] / "jobs"
SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
MINIMAL = "data: {source: synthetic}\nstages: [{algorithm: soar}]\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> JobConfig:
    return load_job(write(tmp_path, "job.yaml", text), overrides)


@pytest.mark.parametrize("job", sorted(p.name for p in JOBS.glob("*.yaml")))
def test_job_file_loads_and_round_trips_through_dump(job: str, tmp_path: Path) -> None:
    cfg = load_job(JOBS / job)
    assert cfg.name == Path(job).stem
    again = load_job(write(tmp_path, "resolved.yaml", dump_config(cfg)))
    assert again == cfg


def test_all_five_job_files_exist() -> None:
    names = {p.name for p in JOBS.glob("*.yaml")}
    assert names >= {"tiny.yaml", "soar.yaml", "sft.yaml", "grpo.yaml", "soar_grpo.yaml"}


def test_tiny_job_is_the_cpu_default() -> None:
    cfg = load_job(JOBS / "tiny.yaml")
    stage = cfg.stages[0]
    assert isinstance(stage, SoarStage)
    assert (cfg.model.preset, cfg.data.source, cfg.data.synthetic.num_images) == (
        "tiny",
        "synthetic",
        256,
    )
    assert cfg.data.synthetic.resolutions == [(64, 64)] and cfg.data.batch_size == 4
    assert (cfg.cluster.num_learners, cfg.cluster.gpus_per_learner) == (2, 0.0)
    assert cfg.cluster.num_rollout_workers == 1
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == (2, "fp32")
    assert (stage.num_steps, stage.optimizer.lr) == (60, 1e-3)
    assert (cfg.checkpoint.every, cfg.logging.sample_every) == (30, 30)
    assert cfg.output_path == Path("runs/tiny")
    assert cfg.checkpoint_path == Path("runs/tiny/checkpoints")


def test_sft_is_soar_with_the_auxiliary_loss_off() -> None:
    soar, sft = load_job(JOBS / "soar.yaml"), load_job(JOBS / "sft.yaml")
    assert sft.stages[0].lambda_aux == 0.0 and soar.stages[0].lambda_aux == 1.0
    same_stage = sft.stages[0].model_copy(update={"lambda_aux": 1.0, "name": None})
    assert same_stage == soar.stages[0]
    assert sft.model_copy(update={"name": "soar", "stages": soar.stages}) == soar


def test_soar_grpo_chains_the_stages_on_the_soar_topology() -> None:
    cfg, soar = load_job(JOBS / "soar_grpo.yaml"), load_job(JOBS / "soar.yaml")
    assert [s.algorithm for s in cfg.stages] == ["soar", "grpo"]
    assert cfg.stage_names == ["soar", "grpo"]
    assert cfg.stages[1].rewards == {"ocr": 1.0} and cfg.stages[1].lora.enabled
    assert (cfg.model, cfg.cluster.num_learners) == (soar.model, soar.cluster.num_learners)


def test_soar_defaults_are_the_spec_reference_run() -> None:
    stage = SoarStage()
    assert stage.num_steps == 5000 and stage.lambda_aux == 1.0
    assert (stage.num_rollout_paths, stage.trajectory_length) == (1, 6)
    assert (stage.rollout_kind, stage.noise_scale) == ("flow_sde", 0.5)
    assert (stage.cfg_scale_sampling, stage.num_sampling_steps) == (4.5, 40)
    assert stage.sigma_upper_ratio is None and stage.cond_dropout_rate == 0.0
    assert (stage.timestep_density, stage.logit_mean, stage.logit_std) == (
        "logit_normal",
        0.0,
        1.0,
    )
    assert stage.mode_scale == 1.29 and stage.weighting_scheme == "none"
    opt = stage.optimizer
    assert (opt.lr, opt.betas, opt.eps, opt.weight_decay, opt.grad_clip) == (
        2e-5,
        (0.9, 0.999),
        1e-8,
        1e-2,
        1.0,
    )
    assert opt.lr_schedule == "constant" and not stage.lora.enabled and not stage.ema.enabled


def test_grpo_defaults_are_spec_section_3() -> None:
    stage = GrpoStage()
    assert (stage.num_sampling_steps, stage.eval_num_sampling_steps, stage.cfg_scale) == (
        10,
        40,
        4.5,
    )
    assert (stage.group_size, stage.num_groups_per_epoch) == (24, 48)
    assert (stage.noise_level, stage.sde_kind, stage.timestep_fraction) == (0.7, "flow_sde", 0.99)
    assert (stage.clip_range, stage.adv_clip_max, stage.global_std) == (1e-4, 5.0, True)
    assert stage.beta == 0.04 and stage.rewards == {"ocr": 1.0}
    assert (stage.optimizer.lr, stage.optimizer.weight_decay, stage.optimizer.grad_clip) == (
        3e-4,
        1e-4,
        1.0,
    )
    assert (stage.lora.enabled, stage.lora.r, stage.lora.alpha, stage.lora.init) == (
        True,
        32,
        64.0,
        "gaussian",
    )
    assert (stage.ema.enabled, stage.ema.decay, stage.ema.every) == (True, 0.9, 8)


def test_job_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    assert (cfg.name, cfg.seed, cfg.output_path) == ("job", 42, Path("runs/job"))
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == (2, "bf16")
    assert (cfg.checkpoint.every, cfg.checkpoint.keep_last, cfg.checkpoint.resume) == (
        1000,
        3,
        "auto",
    )
    assert (cfg.data.batch_size, cfg.cluster.num_learners, cfg.cluster.gpus_per_learner) == (
        4,
        1,
        1.0,
    )
    assert cfg.stages[0].lora.target_modules == (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    )


def _sections(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    seen.add(model)
    for field in model.model_fields.values():
        for inner in models_in_annotation(field.annotation):
            if inner not in seen:
                _sections(inner, seen)
    return seen


def test_every_field_has_a_one_line_description() -> None:
    sections = _sections(JobConfig, set())
    assert SoarStage in sections and GrpoStage in sections
    for section in sections:
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no description"
            assert "\n" not in field.description, f"{section.__name__}.{name}"


def test_overrides_reach_nested_fields_list_items_and_coerce_types(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        MINIMAL,
        (
            "stages.0.lambda_aux=0",
            "stages.0.optimizer.lr=1e-3",
            "deepspeed.zero_stage=3",
            "cluster.gpus_per_learner=0",
            "deepspeed.precision=fp32",
            "data.flip=true",
            "data.synthetic.resolutions=[[64, 48], [48, 64]]",
            "data.prompts.path=prompts.txt",
            "model.pretrained=null",
            "name=123",
        ),
    )
    assert cfg.stages[0].lambda_aux == 0.0 and cfg.stages[0].optimizer.lr == 1e-3
    assert cfg.deepspeed.zero_stage == 3 and cfg.cluster.gpus_per_learner == 0.0
    assert cfg.data.flip is True and cfg.data.synthetic.resolutions == [(64, 48), (48, 64)]
    assert cfg.data.prompts is not None and cfg.data.prompts.kind == "text"
    assert cfg.model.pretrained is None and cfg.name == "123"


def test_overrides_can_replace_the_stage_list(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL, ("stages=[{algorithm: soar}, {algorithm: soar, name: b}]",))
    assert cfg.stage_names == ["0-soar", "b"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("stages.0.lambda_aux", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("stages.1.lambda_aux=0", "stages.1: no such item (the list has 1 items)"),
        ("stages.x.lambda_aux=0", "stages.x: no such item"),
        ("data.source.kind=3", "data.source.kind: parent is not a mapping"),
        ("seed=[1", "value is not valid YAML"),
    ],
)
def test_bad_overrides_are_refused(tmp_path: Path, override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="override") as info:
        load_text(tmp_path, MINIMAL, (override,))
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (MINIMAL + "seeed: 1\n", (), "seeed: unknown key; did you mean 'seed'?"),
        (
            "data: {source: synthetic}\nstages: [{algorithm: soar, lamda_aux: 1}]\n",
            (),
            "stages.0.lamda_aux: unknown key; did you mean 'lambda_aux'?",
        ),
        (
            MINIMAL,
            ("stages.0.optimizer.betaz=[0.9, 0.9]",),
            "stages.0.optimizer.betaz: unknown key",
        ),
        (
            MINIMAL,
            ("stages.0.num_steps=many",),
            "stages.0.num_steps: Input should be a valid integer",
        ),
        (MINIMAL, ("seed.value=3",), "seed: Input should be a valid integer (got {'value': 3})"),
        (MINIMAL, ("stages.0.lambda_aux=-1",), "stages.0.lambda_aux: must be >= 0"),
        (MINIMAL, ("deepspeed.zero_stage=4",), "deepspeed.zero_stage: must be <= 3 (got 4)"),
        (MINIMAL, ("stages.0.rollout_kind=euler",), "stages.0.rollout_kind: must be one of"),
        (
            MINIMAL,
            ("stages.0.algorithm=ppo",),
            "stages.0.algorithm: must be one of ['soar', 'grpo']",
        ),
        (MINIMAL, ("stages=[{num_steps: 3}]",), "stages.0.algorithm: required field is missing"),
        (MINIMAL, ("stages=[]",), "stages: must have at least 1 item(s)"),
        (MINIMAL, ("model.resolution=100",), "model.resolution: must be a multiple of 16"),
        (MINIMAL, ("stages.0.noise_scale=.inf",), "stages.0.noise_scale: must be a finite number"),
        (MINIMAL, ("stages.0.name=a/b",), "stages.0.name: must be a word"),
    ],
)
def test_invalid_values_name_the_file_and_the_dotted_field(
    tmp_path: Path, text: str, overrides: tuple[str, ...], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, overrides)
    message = str(info.value)
    assert str(tmp_path / "job.yaml") in message and expected in message
    if overrides:
        assert f"(from override {overrides[0]!r})" in message


def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate key 'seed' on line 4"):
        load_text(tmp_path, MINIMAL + "seed: 1\nseed: 2\n")


def test_extends_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", MINIMAL + "seed: 7\nmodel: {preset: tiny, t5_max_length: 32}\n")
    child = write(
        tmp_path,
        "sub/child.yaml",
        "extends: ../base.yaml\nmodel: {t5_max_length: 16}\nstages: [{algorithm: soar, name: x}]\n",
    )
    cfg = load_job(child)
    assert (cfg.name, cfg.seed) == ("child", 7)
    assert (cfg.model.preset, cfg.model.t5_max_length) == ("tiny", 16)
    assert cfg.stage_names == ["x"]


def test_extends_cycles_and_missing_bases_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "extends: b.yaml\n" + MINIMAL)
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_job(tmp_path / "a.yaml")
    write(tmp_path, "self.yaml", "extends: self.yaml\n")
    with pytest.raises(ConfigError, match="extends cycle"):
        load_job(tmp_path / "self.yaml")
    write(tmp_path, "orphan.yaml", "extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml: job file not found \(extended by"):
        load_job(tmp_path / "orphan.yaml")


GRPO = ("data.prompts.path=p.txt", "cluster.num_rollout_workers=1", "stages.0.eval_every=0")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("stages.0.mode=disaggregated",), "stages.0.mode: 'disaggregated' needs cluster"),
        (("data.source=jsonl",), "data.jsonl: must be set: stage 0 trains on data.source 'jsonl'"),
        (("data.source=cache",), "data.cache_dir: must be set"),
        (("stages=[{algorithm: grpo}]",), "data.prompts: must be set: stage 0 is a grpo stage"),
        (
            ("stages=[{algorithm: grpo, rewards: {pickscore: 1}}]", *GRPO),
            "stages.0.rewards.pickscore: 'pickscore' is not configured; add rewards.pickscore",
        ),
        (
            ("stages=[{algorithm: grpo, rewards: {pickscor: 1}}]", *GRPO),
            "stages.0.rewards.pickscor: unknown reward 'pickscor'; known: ['aesthetic',",
        ),
        (
            ("stages=[{algorithm: grpo, eval_rewards: [hpsv2]}]", *GRPO),
            "stages.0.eval_rewards.0: 'hpsv2' is not configured",
        ),
        (
            ("stages=[{algorithm: grpo}]", "data.prompts.path=p.txt"),
            "cluster.num_rollout_workers: stage 0 is a grpo stage, which samples on rollout",
        ),
        (
            (
                "stages=[{algorithm: grpo, eval_every: 5}]",
                "data.prompts.path=p.txt",
                "cluster.num_rollout_workers=1",
            ),
            "data.eval_prompts: must be set: stage 0 evaluates every 5 epochs",
        ),
        (
            ("stages=[{algorithm: grpo, group_size: 24, num_groups_per_epoch: 1}]", *GRPO),
            "stages.0.group_size: 24 images per prompt is larger than "
            "the batch of one update (group_size x num_groups_per_epoch / num_updates_per_epoch "
            "= 12)",
        ),
        (
            ("stages=[{algorithm: grpo, group_size: 3, num_groups_per_epoch: 5}]", *GRPO),
            "stages.0.num_groups_per_epoch: group_size x num_groups_per_epoch = 15 images must "
            "split evenly over cluster.num_learners x num_updates_per_epoch = 2",
        ),
        (
            ("stages=[{algorithm: soar}, {algorithm: soar, name: 0-soar}]",),
            "stages.1.name: '0-soar'",
        ),
        (("cluster.gpus_per_learner=0",), "deepspeed.precision: 'bf16' needs GPUs"),
        (
            ("deepspeed.offload_params=true",),
            "deepspeed.offload_params: needs deepspeed.zero_stage 3",
        ),
        (("deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"), "zero_stage >= 1"),
        (
            ("deepspeed.zero_stage=3", "stages.0.ema.enabled=true"),
            "stages.0.ema.enabled: EMA needs whole parameters on every rank",
        ),
        (
            ("cluster.colocate_rollout_with_learners=true",),
            "needs cluster.num_rollout_workers >= 1",
        ),
        (("cluster.reward_actors.ocr.num_actors=2",), "cluster.reward_actors.ocr: no stage"),
        (("stages.0.optimizer.warmup_steps=10",), "stages.0.optimizer.warmup_steps: must be >= 1"),
        (
            (
                "cluster.gpus_per_learner=0",
                "deepspeed.precision=fp32",
                "deepspeed.zero_stage=0",
                "stages.0.optimizer.on_nonfinite=skip_step",
            ),
            "stages.0.optimizer.on_nonfinite: 'skip_step' needs deepspeed.zero_stage >= 1",
        ),
        (("output_dir=runs/{nam}",), "output_dir: bad placeholder in 'runs/{nam}'"),
        (
            ("deepspeed.enabled=false", "cluster.num_learners=2"),
            "deepspeed.enabled: false trains one learner in plain torch; cluster.num_learners is 2",
        ),
        (
            ("deepspeed.enabled=false", "cluster.num_learners=1", "deepspeed.offload_optimizer=1"),
            "deepspeed.enabled: false has no CPU offload",
        ),
    ],
)
def test_cross_field_checks(tmp_path: Path, overrides: tuple[str, ...], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, MINIMAL, overrides)
    assert expected in str(info.value)


def test_cross_field_checks_accept_the_consistent_version(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        MINIMAL,
        (
            "stages=[{algorithm: grpo, rewards: {pickscore: 1, ocr: 0.5}}]",
            "rewards.pickscore.options.checkpoint=/ckpt/pickscore",
            *GRPO,
            "cluster.reward_actors.ocr.num_actors=2",
            "stages.0.optimizer.lr_schedule=warmup",
            "stages.0.optimizer.warmup_steps=10",
            "output_dir=runs/{name}-{seed}",
            "checkpoint.dir=/ckpt/{name}",
        ),
    )
    assert cfg.rewards["pickscore"].options == {"checkpoint": "/ckpt/pickscore"}
    assert cfg.output_path == Path("runs/job-42") and cfg.checkpoint_path == Path("/ckpt/job")
    assert cfg.synthetic_path == Path("runs/job-42/synthetic")


def test_validate_paths_names_each_missing_input(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        MINIMAL,
        (
            "data.source=jsonl",
            "data.jsonl=rows.jsonl",
            "data.image_dir=images",
            "data.eval_prompts.path=eval.txt",
            "model.pretrained=weights",
        ),
    )
    with pytest.raises(ConfigError) as info:
        cfg.validate_paths(tmp_path)
    lines = str(info.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "model.pretrained",
        "data.jsonl",
        "data.image_dir",
        "data.eval_prompts.path",
    ]
    write(tmp_path, "rows.jsonl", "")
    write(tmp_path, "eval.txt", "a cat\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "weights").mkdir()
    cfg.validate_paths(tmp_path)
    (tmp_path / "images").rmdir()
    write(tmp_path, "images", "a file, not a folder")
    with pytest.raises(ConfigError, match="data.image_dir: folder not found"):
        cfg.validate_paths(tmp_path)


def test_validate_paths_accepts_the_shared_prompt_files() -> None:
    if not SHARED_PROMPTS.is_dir():
        pytest.skip(f"shared data not present at {SHARED_PROMPTS}")
    cfg = load_job(
        JOBS / "grpo.yaml",
        (
            f"data.prompts.path={SHARED_PROMPTS / 'ocr_test.txt'}",
            f"data.eval_prompts.path={SHARED_PROMPTS / 'geneval_test_metadata.jsonl'}",
            "data.eval_prompts.kind=geneval",
            "model.pretrained=null",
        ),
    )
    cfg.validate_paths()


def test_configs_are_frozen_and_refuse_unknown_fields() -> None:
    stage = SoarStage()
    with pytest.raises(ValidationError, match="frozen"):
        stage.lambda_aux = 2.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="lambda_auxx"):
        SoarStage(lambda_auxx=2.0)  # type: ignore[call-arg]


def test_reward_failure_policy_and_task_retries(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    assert cfg.cluster.max_task_retries == 3
    cfg = load_text(
        tmp_path,
        MINIMAL,
        ("rewards.ocr.on_bad_score=drop", "cluster.max_task_retries=0"),
    )
    assert cfg.rewards["ocr"].on_bad_score == "drop" and cfg.cluster.max_task_retries == 0
    ocr = load_text(tmp_path, MINIMAL, ("rewards.ocr.device=cpu",)).rewards["ocr"]
    assert ocr.on_bad_score == "error"
    with pytest.raises(ConfigError, match="rewards.ocr.on_bad_score"):
        load_text(tmp_path, MINIMAL, ("rewards.ocr.on_bad_score=skip",))
    with pytest.raises(ConfigError, match="cluster.max_task_retries"):
        load_text(tmp_path, MINIMAL, ("cluster.max_task_retries=-1",))

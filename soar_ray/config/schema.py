"""Job-level sections of the job schema and `JobConfig`, which validates them together."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from soar_ray.config.base import (
    ConfigError,
    Count,
    NonNegFloat,
    NonNegInt,
    Pixels,
    PosFloat,
    Precision,
    Section,
    Word,
    format_path,
)
from soar_ray.config.stages import GrpoStage, SoarStage, Stage

DEFAULT_SAMPLE_PROMPTS = (
    "a photo of a cat sitting on a red sofa",
    'a wooden sign that says "SOAR"',
    "a blue bicycle leaning against a brick wall",
    "a bowl of oranges on a kitchen table",
)
# Rewards whose models ship with their Python package (rapidocr, the OpenCV COCO detector) run
# without options; every other reward needs local checkpoint paths under `rewards`.
OPTION_FREE_REWARDS = frozenset(
    {"ocr", "geneval", "shapes_geneval", "jpeg_compressibility", "jpeg_incompressibility"}
)


class ModelConfig(Section):
    """The SD3-family model and the dtypes of its frozen parts."""

    preset: Literal["tiny", "sd35-medium", "sd35-large"] = "sd35-medium"
    """Architecture with random weights; `tiny` runs on a laptop CPU."""
    pretrained: str | None = None
    """Diffusers folder of real weights (e.g. stable-diffusion-3.5-medium); wins over `preset`."""
    transformer: str | None = None
    """Diffusers transformer folder to start from instead (e.g. a finished run's stage output)."""
    t5_max_length: Annotated[int, Field(ge=1, le=512)] = 77
    """T5 tokens per prompt (reference `max_sequence_length` 77)."""
    resolution: Pixels = 512
    """Side in pixels of generated images (GRPO rollouts, samples, evaluation)."""
    dtype: Precision = "bf16"
    """Dtype of the frozen text encoders."""
    vae_dtype: Precision = "fp32"
    """Dtype of the frozen VAE; fp32 as in the reference, bf16 decoding shifts colours."""


class SyntheticDataConfig(Section):
    """A generated captioned image set, so the default job needs no download."""

    num_images: Count = 256
    """Generated captioned images."""
    resolutions: list[tuple[Pixels, Pixels]] = Field([(64, 64)], min_length=1)
    """(width, height) buckets the images are spread over."""
    seed: int = 0
    """Seed of the generator; the same seed gives the same images."""
    dir: str = "{output_dir}/synthetic"
    """Folder of the generated jsonl and images (made once, reused)."""


class PromptsConfig(Section):
    """A prompt set for RL or evaluation."""

    path: str
    """Prompt file."""
    kind: Literal["text", "ocr", "geneval", "drawbench"] = "text"
    """`text` a prompt a line; `ocr` one "quoted" target each; `geneval` JSONL; `drawbench` CSV."""


class DataConfig(Section):
    """Training images (SOAR) and prompt sets (GRPO, evaluation)."""

    source: Literal["synthetic", "jsonl", "cache"] = "jsonl"
    """Training images of SOAR stages: generated, a reference-format JSONL, or a latent cache."""
    jsonl: str | None = None
    """JSONL of {md5, caption_en, bw, bh} rows (source `jsonl`)."""
    image_dir: str | None = None
    """Folder of `{md5}.jpg` images (source `jsonl`)."""
    caption_key: str = "caption_en"
    """JSONL key of the caption."""
    cache_dir: str | None = None
    """Parquet latent/embedding cache (source `cache`, or where `prepare` writes one)."""
    cache_dtype: Literal["fp16", "fp32"] = "fp16"
    """Storage dtype of cached latents and embeddings."""
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    """Generated data set (source `synthetic`)."""
    batch_size: Count = 4
    """Images per learner per micro-batch."""
    flip: bool = False
    """Random horizontal flips (off in the reference run)."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """A bad row or image stops the run, or is skipped and counted."""
    verify_images: bool = False
    """Fully decode every image while indexing: a truncated one is found before training starts."""
    num_workers: NonNegInt = 8
    """Data-loader worker processes per learner."""
    max_samples: Count | None = None
    """Use only the first rows (debugging); null uses all."""
    prompts: PromptsConfig | None = None
    """Training prompts of GRPO stages."""
    eval_prompts: PromptsConfig | None = None
    """Evaluation prompts."""


class RewardActorsConfig(Section):
    """Ray actors scoring one reward."""

    num_actors: Count = 1
    """Scoring actors of this reward."""
    num_gpus: NonNegFloat = 0.0
    """GPUs per actor (a fraction shares a GPU)."""
    num_cpus: NonNegFloat = 1.0
    """Ray logical CPUs per actor."""

    @model_validator(mode="after")
    def _check_reserves(self) -> RewardActorsConfig:
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError("num_cpus: an actor must reserve some CPU or GPU (both are 0)")
        return self


class ClusterConfig(Section):
    """The Ray topology: learners, rollout workers, reward actors."""

    address: str | None = None
    """Ray address; null uses RAY_ADDRESS, else starts an embedded local Ray."""
    num_learners: Count = 1
    """Data-parallel learner actors (DeepSpeed ranks)."""
    gpus_per_learner: NonNegFloat = 1.0
    """GPUs per learner; 0 trains on CPU (gloo)."""
    cpus_per_learner: NonNegFloat = 1.0
    """Ray logical CPUs per learner."""
    num_rollout_workers: NonNegInt = 0
    """Rollout actors; 0 means learners roll out themselves."""
    gpus_per_rollout_worker: NonNegFloat = 1.0
    """GPUs per rollout worker."""
    cpus_per_rollout_worker: NonNegFloat = 1.0
    """Ray logical CPUs per rollout worker."""
    colocate_rollout_with_learners: bool = False
    """Put rollout workers on the learners' GPUs (fractions that must sum to <= 1)."""
    compile_rollout_blocks: bool = False
    """torch.compile the rollout workers' MMDiT blocks (sampling, aux points, evaluation)."""
    reward_actors: dict[Word, RewardActorsConfig] = {}
    """Reward name -> its actors; a reward not listed gets the defaults."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy of the job's one placement group."""
    start_timeout_s: PosFloat = 600.0
    """Seconds to wait for the placement group and actors to start."""
    call_timeout_s: PosFloat = 3600.0
    """Seconds one remote call (train step, rollout, scoring) may take."""
    stall_timeout_s: PosFloat = 300.0
    """Least seconds before a learner call timed 3 times is stalled (else 10 x its median)."""
    max_job_restarts: NonNegInt = 0
    """Times the run resumes by itself from its last checkpoint after a learner dies or stalls."""
    max_actor_restarts: NonNegInt = 3
    """Restarts of a failed rollout or reward actor before the job fails."""
    max_task_retries: NonNegInt = 3
    """Reruns of a reward-scoring or rollout call whose actor was lost (after Ray restarts it)."""
    weight_sync: Literal["auto", "object_store", "collective"] = "auto"
    """Learner -> rollout weights: `object_store`, `collective` (NCCL/gloo broadcast), or `auto`."""

    @property
    def rollout_gpus_own(self) -> bool:
        """Every rollout worker holds whole GPUs that no learner shares (NCCL takes one rank per
        GPU)."""
        return self.gpus_per_rollout_worker >= 1 and not self.colocate_rollout_with_learners

    @property
    def weight_sync_backend(self) -> Literal["object_store", "collective"]:
        """`weight_sync` resolved: `auto` is collective when learners hold GPUs and every
        rollout worker whole ones of its own."""
        if self.weight_sync != "auto":
            return self.weight_sync
        own_gpus = self.gpus_per_learner > 0 and self.rollout_gpus_own
        return "collective" if own_gpus else "object_store"


class DeepSpeedConfig(Section):
    """The learners' DeepSpeed engine; clipping and batch sizes come from the stage."""

    enabled: bool = True
    """False: one learner trains in plain torch, no ZeRO (faster for small models)."""
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 2
    """ZeRO stage."""
    precision: Precision = "bf16"
    """Training precision; CPU learners need fp32."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO >= 1)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO 3)."""
    activation_checkpointing: bool | NonNegInt = True
    """Recompute MMDiT block activations in backward: true for all, N for the first N blocks."""
    compile_blocks: bool = False
    """torch.compile the learners' MMDiT blocks (the first steps of a stage compile them)."""
    allow_tf32: bool = True
    """TF32 matmuls on Ampere+ GPUs for fp32 work (reference `--allow_tf32`)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    reduce_bucket_size: Count = 500_000_000
    """Elements per gradient-reduction bucket."""


class CheckpointConfig(Section):
    """Atomic checkpoints and resume."""

    every: Count = 1000
    """Stage iterations (SOAR steps, GRPO epochs) between checkpoints."""
    keep_last: Count = 3
    """Complete checkpoints kept; older ones are deleted."""
    resume: Annotated[str, Field(min_length=1)] = "auto"
    """`auto`: newest complete checkpoint if any; `never`; or a checkpoint path."""
    dir: str = "{output_dir}/checkpoints"
    """Checkpoint folder."""


class LoggingConfig(Section):
    """Metrics, progress and sample grids."""

    every: Count = 1
    """Stage iterations between metric records."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    jsonl: bool = True
    """Write metrics.jsonl."""
    ray_metrics: bool = True
    """Export metrics to the Ray dashboard (Prometheus)."""
    progress_bar: bool = True
    """Show a progress bar on the driver."""
    sample_every: NonNegInt = 0
    """Stage iterations between sample grids; 0 turns them off."""
    num_sample_prompts: Count = 4
    """Prompts in a sample grid."""
    sample_prompts: list[str] = Field(list(DEFAULT_SAMPLE_PROMPTS), min_length=1)
    """Prompts of the sample grids."""
    sample_prompts_file: str | None = None
    """Text file of prompts used instead of `sample_prompts` when set."""
    num_sample_steps: Count = 40
    """ODE steps of a sample."""
    sample_cfg_scale: NonNegFloat = 4.5
    """CFG guidance of a sample."""


class RewardConfig(Section):
    """Settings of one reward model."""

    options: dict[str, Any] = {}
    """Reward-specific options (checkpoint paths, backend, ...), checked by the reward itself."""
    batch_size: Count = 16
    """Images per scoring call."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: cuda when the actor holds a GPU, else cpu."""
    on_bad_score: Literal["error", "drop"] = "error"
    """A scoring exception or NaN is an error naming reward and prompt, or drops the sample."""


def check_reward(configured: Mapping[str, Any], field: str, reward: str) -> None:
    """`reward` is registered and, unless it needs no options, has a `rewards.<name>` entry."""
    import rewards as registry  # the names only; no reward model is imported

    if reward not in registry.REGISTRY:
        raise ValueError(f"{field}: unknown reward {reward!r}; known: {registry.names()}")
    if reward not in configured and reward not in OPTION_FREE_REWARDS:
        raise ValueError(
            f"{field}: {reward!r} is not configured; add rewards.{reward}.options "
            f"(only {sorted(OPTION_FREE_REWARDS)} run without options)"
        )


class JobConfig(Section):
    """A whole job: model, data, stages and where they run."""

    name: Word
    """Job name; defaults to the job file's stem."""
    output_dir: str = "runs/{name}"
    """Run folder (metrics, samples, stage outputs)."""
    seed: int = 42
    """Global seed; ranks and workers derive theirs from it."""
    model: ModelConfig = ModelConfig()
    """The text-to-image model."""
    data: DataConfig = DataConfig()
    """Training images and prompt sets."""
    stages: list[Stage] = Field(min_length=1)
    """Stages run in order on one topology; each starts from the previous one's weights."""
    cluster: ClusterConfig = ClusterConfig()
    """Ray topology."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """Learner engine."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpointing and resume."""
    logging: LoggingConfig = LoggingConfig()
    """Metrics and samples."""
    rewards: dict[Word, RewardConfig] = {}
    """Reward name -> its settings."""

    @property
    def stage_names(self) -> list[str]:
        """Stage names, `{index}-{algorithm}` where a stage has none."""
        return [s.name or f"{i}-{s.algorithm}" for i, s in enumerate(self.stages)]

    @property
    def reward_names(self) -> list[str]:
        """Every reward the GRPO stages train on or evaluate with, in first-use order."""
        names: dict[str, None] = {}
        for stage in self.stages:
            if isinstance(stage, GrpoStage):
                names |= dict.fromkeys([*stage.rewards, *stage.eval_rewards])
        return list(names)

    @property
    def output_path(self) -> Path:
        """`output_dir` with its placeholders filled."""
        return Path(format_path(self.output_dir, "output_dir", name=self.name, seed=self.seed))

    @property
    def checkpoint_path(self) -> Path:
        """`checkpoint.dir` with its placeholders filled."""
        return self._fill(self.checkpoint.dir, "checkpoint.dir")

    @property
    def synthetic_path(self) -> Path:
        """`data.synthetic.dir` with its placeholders filled."""
        return self._fill(self.data.synthetic.dir, "data.synthetic.dir")

    def _fill(self, template: str, field: str) -> Path:
        values = {"name": self.name, "seed": self.seed, "output_dir": str(self.output_path)}
        return Path(format_path(template, field, **values))

    @model_validator(mode="after")
    def _check_stages(self) -> JobConfig:
        names = self.stage_names
        for i, stage in enumerate(self.stages):
            if names.index(names[i]) != i:
                raise ValueError(f"stages.{i}.name: {names[i]!r} is used by an earlier stage")
            if isinstance(stage, SoarStage):
                self._check_soar_stage(i, stage)
            else:
                self._check_grpo_stage(i, stage)
        return self

    def _check_soar_stage(self, i: int, stage: SoarStage) -> None:
        if stage.mode == "disaggregated" and self.cluster.num_rollout_workers < 1:
            raise ValueError(
                f"stages.{i}.mode: 'disaggregated' needs cluster.num_rollout_workers >= 1"
            )
        needed = {"jsonl": ("jsonl", "image_dir"), "cache": ("cache_dir",)}
        for key in needed.get(self.data.source, ()):
            if getattr(self.data, key) is None:
                raise ValueError(
                    f"data.{key}: must be set: stage {i} trains on data.source {self.data.source!r}"
                )

    def _check_grpo_stage(self, i: int, stage: GrpoStage) -> None:
        if self.data.prompts is None:
            raise ValueError(f"data.prompts: must be set: stage {i} is a grpo stage")
        if self.cluster.num_rollout_workers < 1:
            raise ValueError(
                f"cluster.num_rollout_workers: stage {i} is a grpo stage, which samples on "
                "rollout workers; set it >= 1 (colocate_rollout_with_learners shares their GPUs)"
            )
        fields = [(f"stages.{i}.rewards.{r}", r) for r in stage.rewards]
        fields += [(f"stages.{i}.eval_rewards.{k}", r) for k, r in enumerate(stage.eval_rewards)]
        for field, reward in fields:
            check_reward(self.rewards, field, reward)
        if stage.eval_every and self.data.eval_prompts is None:
            raise ValueError(
                f"data.eval_prompts: must be set: stage {i} evaluates every "
                f"{stage.eval_every} epochs (stages.{i}.eval_every 0 turns evaluation off)"
            )
        ranks = self.cluster.num_learners * stage.num_updates_per_epoch
        if stage.group_size * stage.num_groups_per_epoch % ranks:
            raise ValueError(
                f"stages.{i}.num_groups_per_epoch: group_size x num_groups_per_epoch = "
                f"{stage.group_size * stage.num_groups_per_epoch} images must split evenly over "
                f"cluster.num_learners x num_updates_per_epoch = {ranks}"
            )

    @model_validator(mode="after")
    def _check_resources(self) -> JobConfig:
        cluster, engine = self.cluster, self.deepspeed
        if cluster.gpus_per_learner == 0 and engine.precision != "fp32":
            raise ValueError(
                f"deepspeed.precision: {engine.precision!r} needs GPUs; CPU learners "
                "(cluster.gpus_per_learner 0) train in 'fp32'"
            )
        for i, stage in enumerate(self.stages):
            if stage.ema.enabled and engine.enabled and engine.zero_stage == 3:
                raise ValueError(
                    f"stages.{i}.ema.enabled: EMA needs whole parameters on every rank; use "
                    "deepspeed.zero_stage <= 2 or turn the stage's EMA off"
                )
            skips = stage.optimizer.on_nonfinite == "skip_step"
            if skips and engine.enabled and engine.zero_stage == 0 and engine.precision == "fp32":
                raise ValueError(
                    f"stages.{i}.optimizer.on_nonfinite: 'skip_step' needs deepspeed.zero_stage "
                    ">= 1 (or bf16 / fp16): DeepSpeed's plain ZeRO-0 fp32 optimizer applies a "
                    "non-finite gradient"
                )
        if not engine.enabled and cluster.num_learners > 1:
            raise ValueError(
                f"deepspeed.enabled: false trains one learner in plain torch; "
                f"cluster.num_learners is {cluster.num_learners}"
            )
        if not engine.enabled and (engine.offload_params or engine.offload_optimizer):
            raise ValueError("deepspeed.enabled: false has no CPU offload; turn offload off")
        if engine.compile_blocks and engine.enabled and engine.zero_stage == 3:
            raise ValueError("deepspeed.compile_blocks: not with deepspeed.zero_stage 3 (its "
                             "parameters are gathered in module hooks); use zero_stage <= 2")  # fmt: skip
        if engine.offload_params and engine.zero_stage != 3:
            raise ValueError("deepspeed.offload_params: needs deepspeed.zero_stage 3")
        if engine.offload_optimizer and engine.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1")
        if cluster.colocate_rollout_with_learners:
            if cluster.num_rollout_workers < 1:
                raise ValueError(
                    "cluster.colocate_rollout_with_learners: needs cluster.num_rollout_workers >= 1"
                )
            if cluster.gpus_per_learner + cluster.gpus_per_rollout_worker > 1:
                raise ValueError(
                    "cluster.gpus_per_rollout_worker: colocated workers share a learner's GPU, "
                    "so gpus_per_learner + gpus_per_rollout_worker must be <= 1"
                )
        gpus = cluster.gpus_per_learner > 0
        if cluster.weight_sync == "collective" and gpus and not cluster.rollout_gpus_own:
            raise ValueError(
                "cluster.weight_sync: 'collective' on GPUs needs whole GPUs of its own for every "
                "rollout worker (NCCL takes one rank per GPU): set cluster.gpus_per_rollout_worker "
                ">= 1 and colocate_rollout_with_learners false, or weight_sync object_store"
            )
        used = set(self.rewards).union(self.reward_names)
        for reward in cluster.reward_actors:
            if reward not in used:
                raise ValueError(
                    f"cluster.reward_actors.{reward}: no stage or rewards entry uses it"
                )
        return self

    @model_validator(mode="after")
    def _check_templates(self) -> JobConfig:
        # Fill every path template once so a bad placeholder fails at load time, not mid-run.
        _ = (self.output_path, self.checkpoint_path, self.synthetic_path)
        return self

    def validate_paths(self, base_dir: str | Path | None = None) -> None:
        """Check that every input path the job uses exists (relative to `base_dir` or the CWD)."""
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        missing = []
        for field, path, kind in self._input_paths():
            found = (base / path).is_dir() if kind == "folder" else (base / path).is_file()
            if not found:
                missing.append(f"{field}: {kind} not found: {base / path}")
        if missing:
            raise ConfigError(f"job {self.name!r}: missing input paths:\n  " + "\n  ".join(missing))

    def _input_paths(self) -> list[tuple[str, str, str]]:
        """(dotted field, path, "file" | "folder") of every input the job reads."""
        data = self.data
        paths = [("model.pretrained", self.model.pretrained, "folder"),
                 ("model.transformer", self.model.transformer, "folder")]  # fmt: skip
        if data.source == "jsonl":
            paths += [
                ("data.jsonl", data.jsonl, "file"),
                ("data.image_dir", data.image_dir, "folder"),
            ]
        if data.source == "cache":
            paths.append(("data.cache_dir", data.cache_dir, "folder"))
        for key in ("prompts", "eval_prompts"):
            prompts = getattr(data, key)
            paths.append((f"data.{key}.path", prompts and prompts.path, "file"))
        paths.append(("logging.sample_prompts_file", self.logging.sample_prompts_file, "file"))
        if self.checkpoint.resume not in ("auto", "never"):
            paths.append(("checkpoint.resume", self.checkpoint.resume, "folder"))
        return [(field, path, kind) for field, path, kind in paths if path is not None]

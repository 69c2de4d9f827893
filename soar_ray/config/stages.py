"""Stage sections of the job schema: SOAR (SPEC §1) and Flow-GRPO (SPEC §3) with their parts."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from soar_ray.config.base import (
    Count,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    Probability,
    Section,
    Word,
)

SPEC_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip


class LoraConfig(Section):
    """LoRA adapters of a stage (SPEC §3)."""

    enabled: bool = False
    """Train LoRA adapters (peft) instead of all transformer weights."""
    r: Count = 32
    """Adapter rank (SPEC §3)."""
    alpha: PosFloat = 64.0
    """LoRA alpha; the update is scaled by alpha / r."""
    init: Literal["gaussian", "default"] = "gaussian"
    """peft `init_lora_weights`: gaussian A, zero B, so training starts at the base model."""
    dropout: Probability = 0.0
    """Dropout on the adapter input."""
    target_modules: tuple[str, ...] = Field(SPEC_LORA_TARGETS, min_length=1)
    """Transformer sub-modules that get adapters (SPEC §3: joint-attention projections)."""


class GrpoLoraConfig(LoraConfig):
    """LoRA adapters of a Flow-GRPO stage: on by default."""

    enabled: bool = True
    """Train LoRA adapters; on by default for Flow-GRPO (SPEC §3)."""


class OptimizerConfig(Section):
    """AdamW and its learning-rate schedule; defaults of the SOAR reference run (SPEC §1)."""

    lr: PosFloat = 2e-5
    """AdamW learning rate (SPEC §1 reference run)."""
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: PosFloat = 1e-8
    """AdamW epsilon."""
    weight_decay: NonNegFloat = 1e-2
    """AdamW decoupled weight decay."""
    grad_clip: NonNegFloat = 1.0
    """Global gradient-norm clip (DeepSpeed `gradient_clipping`); 0 turns it off."""
    lr_schedule: Literal["constant", "warmup"] = "constant"
    """`constant`, or `warmup`: linear from 0 over `warmup_steps`, then constant."""
    warmup_steps: NonNegInt = 0
    """Optimizer steps of linear warm-up; needs `lr_schedule: warmup`."""
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    """Non-finite loss or grad norm: stop the run, or skip that step (and stop at 5 in a row)."""

    @model_validator(mode="after")
    def _check_warmup(self) -> OptimizerConfig:
        if (self.lr_schedule == "warmup") != (self.warmup_steps > 0):
            raise ValueError("warmup_steps: must be >= 1 exactly when lr_schedule is 'warmup'")
        return self


class GrpoOptimizerConfig(OptimizerConfig):
    """AdamW of a Flow-GRPO stage (SPEC §3)."""

    lr: PosFloat = 3e-4
    """AdamW learning rate (SPEC §3, LoRA)."""
    weight_decay: NonNegFloat = 1e-4
    """AdamW decoupled weight decay (SPEC §3)."""


class EmaConfig(Section):
    """EMA of the trainable weights (SPEC §3)."""

    enabled: bool = False
    """Keep an EMA of the trainable weights; it is evaluated, saved and handed to the next stage."""
    decay: Probability = 0.9
    """Decay cap; the warm-up decay is min((1 + n) / (10 + n), decay) (SPEC §3)."""
    every: Count = 8
    """Optimizer steps between EMA updates."""


class GrpoEmaConfig(EmaConfig):
    """EMA of a Flow-GRPO stage: on by default."""

    enabled: bool = True
    """Keep an EMA of the trainable weights; on by default for Flow-GRPO (SPEC §3)."""


class StageBase(Section):
    """Fields every stage has."""

    name: Word | None = None
    """Stage name used in logs and paths; default `{index}-{algorithm}`."""
    checkpoint_every: Count | None = None
    """Stage iterations between checkpoints; null uses `checkpoint.every`."""


class SoarStage(StageBase):
    """A SOAR stage (SPEC §1); lambda_aux 0 or trajectory_length 0 is flow-matching SFT."""

    algorithm: Literal["soar"] = "soar"
    """Stage kind: SOAR self-correction (SPEC §1); lambda_aux 0 is plain flow-matching SFT."""
    num_steps: Count = 5000
    """Optimizer steps of the stage."""
    lambda_aux: NonNegFloat = 1.0
    """Weight of the auxiliary (self-correction) loss."""
    num_rollout_paths: Count = 1
    """Rollout paths M: 1 is the ODE path only, more add M - 1 stochastic paths."""
    trajectory_length: NonNegInt = 6
    """Auxiliary points P re-noised along each path; 0 is plain SFT."""
    rollout_kind: Literal["ode", "simple", "sde", "flow_sde", "cps"] = "flow_sde"
    """Step kind of the stochastic paths (SPEC §2)."""
    noise_scale: NonNegFloat = 0.5
    """Noise scale eta of the stochastic paths."""
    cfg_scale_sampling: NonNegFloat = 4.5
    """CFG guidance g of the no-grad rollout forward."""
    num_sampling_steps: Count = 40
    """Sampler steps K that set the rollout step length 1 / K."""
    sigma_upper_ratio: Annotated[float, Field(ge=1)] | None = None
    """Upper sigma of aux points is min(ratio * s0, 1); null is 1, as the reference code does."""
    cond_dropout_rate: Probability = 0.0
    """Probability that a batch trains on the uncond embeddings (reference script default 0)."""
    weighting_scheme: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Loss weight w(sigma) (SPEC §0); the reference's `logit_normal` weights by 1, i.e. `none`."""
    timestep_density: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    """Density of t0 (diffusers `compute_density_for_timestep_sampling`, SPEC §0)."""
    logit_mean: float = 0.0
    """Mean of the normal behind `logit_normal`."""
    logit_std: PosFloat = 1.0
    """Standard deviation of the normal behind `logit_normal`."""
    mode_scale: float = 1.29
    """Scale of the `mode` density."""
    aux_eval: Literal["fused", "sequential"] = "fused"
    """One batched forward for main and aux points, or one forward each (tight memory)."""
    mode: Literal["colocated", "disaggregated"] = "colocated"
    """Learners roll out themselves (on-policy), or rollout workers make aux points."""
    max_staleness: NonNegInt = 1
    """Policy versions the aux points of a disaggregated rollout may lag the learner."""
    gradient_accumulation_steps: Count = 1
    """Micro-batches per optimizer step."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """AdamW settings."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapters; off: the reference run fine-tunes all transformer weights."""
    ema: EmaConfig = EmaConfig()
    """EMA of trainable weights; off in the reference run."""


class GrpoStage(StageBase):
    """A Flow-GRPO stage (SPEC §3)."""

    algorithm: Literal["grpo"] = "grpo"
    """Stage kind: Flow-GRPO with named rewards (SPEC §3)."""
    num_epochs: Count = 1000
    """Epochs of sample -> score -> train; the reference runs until the reward plateaus."""
    num_sampling_steps: Count = 10
    """SDE steps T of a training rollout."""
    eval_num_sampling_steps: Count = 40
    """ODE steps of an evaluation rollout (noise 0)."""
    eval_every: NonNegInt = 60
    """Epochs between evaluations on `data.eval_prompts` (and before the first); 0: none."""
    num_eval_prompts: Count | None = None
    """Evaluate on the first prompts of `data.eval_prompts` only; null uses all of them."""
    eval_rewards: list[Word] = []
    """Rewards scored at evaluation only, next to `rewards` (a held-out one shows over-optimisation)."""
    cfg_scale: NonNegFloat = 4.5
    """CFG guidance in sampling and in the training forward."""
    group_size: Annotated[int, Field(ge=2)] = 24
    """Images G per prompt; advantages are relative within the group."""
    num_groups_per_epoch: Count = 48
    """Prompts (groups) sampled per epoch, over all rollout ranks."""
    sample_batch_size: Count = 9
    """Images per rollout call (one CFG forward of 2 x this per step) on one worker."""
    train_batch_size: Count = 9
    """Trajectories per training micro-batch on one learner (one CFG forward/backward per step)."""
    num_updates_per_epoch: Count = 2
    """Optimizer steps per pass over an epoch's trajectories (each accumulates its micro-batches)."""
    num_inner_epochs: Count = 1
    """Passes over one epoch's trajectories, each reshuffled."""
    noise_level: NonNegFloat = 0.7
    """SDE noise level eta."""
    sde_kind: Literal["flow_sde", "cps"] = "flow_sde"
    """SDE step with log-prob."""
    timestep_fraction: Annotated[float, Field(gt=0, le=1)] = 0.99
    """Trains on the first floor(T * fraction) steps of each trajectory."""
    clip_range: PosFloat = 1e-4
    """PPO ratio clip eps."""
    adv_clip_max: PosFloat = 5.0
    """Advantages are clipped to +- this."""
    global_std: bool = True
    """Normalise advantages by the std of the whole batch, not of the group."""
    beta: NonNegFloat = 0.04
    """KL weight (0.04 for OCR/GenEval, 0.01 for PickScore)."""
    max_staleness: NonNegInt = 0
    """Epochs the rollout may run ahead of training: 0 is on-policy, k samples epoch n+k during n."""
    rewards: dict[Word, float] = Field(default_factory=lambda: {"ocr": 1.0}, min_length=1)
    """Reward name -> weight; the reward is the weighted sum."""
    optimizer: GrpoOptimizerConfig = GrpoOptimizerConfig()
    """AdamW settings."""
    lora: GrpoLoraConfig = GrpoLoraConfig()
    """LoRA adapters."""
    ema: GrpoEmaConfig = GrpoEmaConfig()
    """EMA of trainable weights."""

    @model_validator(mode="after")
    def _check(self) -> GrpoStage:
        if int(self.num_sampling_steps * self.timestep_fraction) < 1:
            raise ValueError("timestep_fraction: trains on no step; floor(T * fraction) is 0")
        if not any(self.rewards.values()):
            raise ValueError("rewards: every weight is 0")
        num_images = self.group_size * self.num_groups_per_epoch
        per_update = num_images // self.num_updates_per_epoch
        if self.group_size > per_update:
            raise ValueError(
                f"group_size: {self.group_size} images per prompt is larger than the batch of one "
                f"update (group_size x num_groups_per_epoch / num_updates_per_epoch = "
                f"{per_update}); raise num_groups_per_epoch or lower num_updates_per_epoch"
            )
        return self


Stage = Annotated[SoarStage | GrpoStage, Field(discriminator="algorithm")]
STAGE_TYPES: dict[str, type[StageBase]] = {"soar": SoarStage, "grpo": GrpoStage}

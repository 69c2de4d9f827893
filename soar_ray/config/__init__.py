"""Typed, validated job schema and its YAML loader (STYLE.md rule 6).

Defaults are the reference runs: SPEC-algorithms.md §1 for SOAR, §3 for Flow-GRPO. A job file in
jobs/ holds overrides of these defaults only. Loading rules:

- `extends: base.yaml` (top level, relative to the file) merges the file over its base: mappings
  merge key by key; lists and scalars replace, so a file that lists `stages` restates all of them.
- `name` defaults to the stem of the file passed to `load_job`.
- Overrides `a.b.c=value` apply after `extends`; the value is parsed as YAML and list items are
  addressed by index (`stages.0.lambda_aux=0`).
- Relative data paths are relative to the run's working directory (the Ray job's working dir), not
  to the job file, and are checked by `JobConfig.validate_paths()` on the machine with the data.
- Path templates may use `{name}` and `{seed}`; all but `output_dir` may also use `{output_dir}`.
- LoRA is set per stage, so a full fine-tuning SOAR stage can hand its weights to a LoRA Flow-GRPO
  stage whose reference policy is the SOAR result with adapters disabled (SPEC §4).

Every error is a `ConfigError` that names the job file and the dotted field.
"""

from soar_ray.config.base import (
    ConfigError,
    Count,
    NonNegFloat,
    NonNegInt,
    Pixels,
    PosFloat,
    Precision,
    Probability,
    Section,
    Word,
    format_path,
)
from soar_ray.config.loader import dump_config, load_job, models_in_annotation
from soar_ray.config.schema import (
    DEFAULT_SAMPLE_PROMPTS,
    OPTION_FREE_REWARDS,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    DeepSpeedConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    PromptsConfig,
    RewardActorsConfig,
    RewardConfig,
    SyntheticDataConfig,
    check_reward,
)
from soar_ray.config.stages import (
    SPEC_LORA_TARGETS,
    STAGE_TYPES,
    EmaConfig,
    GrpoEmaConfig,
    GrpoLoraConfig,
    GrpoOptimizerConfig,
    GrpoStage,
    LoraConfig,
    OptimizerConfig,
    SoarStage,
    Stage,
    StageBase,
)

__all__ = [
    "DEFAULT_SAMPLE_PROMPTS",
    "OPTION_FREE_REWARDS",
    "check_reward",
    "SPEC_LORA_TARGETS",
    "STAGE_TYPES",
    "CheckpointConfig",
    "ClusterConfig",
    "ConfigError",
    "Count",
    "DataConfig",
    "DeepSpeedConfig",
    "EmaConfig",
    "GrpoEmaConfig",
    "GrpoLoraConfig",
    "GrpoOptimizerConfig",
    "GrpoStage",
    "JobConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "NonNegFloat",
    "NonNegInt",
    "OptimizerConfig",
    "Pixels",
    "PosFloat",
    "Precision",
    "Probability",
    "PromptsConfig",
    "RewardActorsConfig",
    "RewardConfig",
    "Section",
    "SoarStage",
    "Stage",
    "StageBase",
    "SyntheticDataConfig",
    "Word",
    "dump_config",
    "format_path",
    "load_job",
    "models_in_annotation",
]

"""What a resumed run may change, and the metrics rows it takes back.

A checkpoint holds more than weights: the optimizer state with its hyper-parameters and LR
schedule (loading it restores lr, betas, eps and weight decay, whatever the job now says), every
rank's random stream, and a data position that is the step, so the batches after it follow from
the seed, the data set, the batch size and the number of learners. A resume under other settings
would keep the checkpoint's values without saying so, or train on another data order, and the
run's config.yaml would describe neither. So the job must equal the checkpoint's config.yaml,
except for:
- the fields `RESUME_MAY_CHANGE` lists: where the run writes, logging, the checkpoint schedule,
  actor placement, timeouts and weight sync, evaluation, and the length of the resumed stage
  (never below the checkpoint's step);
- the stages after the resumed one, which have not started (a finished stage's settings must
  match: its output is made).
Any other change is refused with every changed field and its two values, so a field the list does
not know is refused rather than silently overridden.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from soar_ray.checkpoint import CheckpointDamaged, CheckpointState
from soar_ray.config import ConfigError, JobConfig, RewardConfig, load_job
from soar_ray.errors import RunStopped
from soar_ray.metrics import drop_jsonl_rows, rebuild_tensorboard

RESUME_MAY_CHANGE = (
    "name", "output_dir", "checkpoint.*", "logging.*",
    "data.num_workers", "data.verify_images", "data.on_bad_sample", "data.eval_prompts*",
    "data.synthetic.dir",
    "cluster.address", "cluster.*_per_*", "cluster.num_rollout_workers",
    "cluster.colocate_rollout_with_learners", "cluster.reward_actors*",
    "cluster.placement_strategy", "cluster.*_timeout_s", "cluster.max_*", "cluster.weight_sync",
    "cluster.compile_rollout_blocks",
    "deepspeed.activation_checkpointing", "deepspeed.compile_blocks", "deepspeed.allow_tf32",
    "deepspeed.overlap_comm", "deepspeed.reduce_bucket_size",
    "rewards.*.device", "rewards.*.batch_size", "rewards.*.on_bad_score",
)  # fmt: skip
"""Dotted fields (fnmatch patterns) a resume may change: they leave the trained state and the data
order alone. Every other field outside `stages` must equal the checkpoint's."""
STAGE_MAY_CHANGE = ("num_steps", "num_epochs", "checkpoint_every", "eval_every",
                    "num_eval_prompts", "eval_num_sampling_steps", "eval_rewards",
                    "optimizer.on_nonfinite")  # fmt: skip
"""Fields (dotted, within the stage) of the resumed stage a resume may change; its length only
to no less than the checkpoint's step; `on_nonfinite` acts only on a step that diverges."""
STAGE_LENGTHS = ("num_steps", "num_epochs")
UNSET = "(unset)"


class SettingsChanged(RunStopped):
    """The job changes settings that the checkpoint it resumes from fixed."""


def changed_settings(saved: JobConfig, job: JobConfig, stage_index: int) -> list[str]:
    """'field old -> new' for every field that differs and may not change when resuming inside
    stage `stage_index`, in the job's field order."""
    trees = saved.model_dump(mode="json"), job.model_dump(mode="json")
    # A reward without a `rewards` entry runs with the defaults: adding one changes nothing itself.
    for name in saved.rewards.keys() | job.rewards.keys():
        for tree in trees:
            tree["rewards"].setdefault(name, RewardConfig().model_dump(mode="json"))
    before, after = map(_flatten, trees)
    changes = []
    for key in [*after, *(key for key in before if key not in after)]:
        old, new = before.get(key, UNSET), after.get(key, UNSET)
        if old != new and not _may_change(key, stage_index):
            changes.append(f"{key} {old!r} -> {new!r}")
    return changes


def check_resume_settings(job: JobConfig, folder: Path, state: CheckpointState) -> None:
    """Refuse a resume from `folder` under settings its checkpoint cannot honour (before any
    actor starts): one line naming every changed field with both values."""
    saved_config = folder / "config.yaml"
    if not saved_config.is_file():
        raise CheckpointDamaged(
            f"checkpoint.resume: {saved_config} is missing, so the settings the checkpoint was "
            "written with are unknown; name another checkpoint, or start over with "
            "checkpoint.resume: never"
        )
    try:
        saved = load_job(saved_config)
    except ConfigError as exc:
        raise ConfigError(
            f"checkpoint.resume: the checkpoint's config does not load: {exc}"
        ) from None
    changes = changed_settings(saved, job, state.stage_index)
    if changes:
        raise SettingsChanged(
            f"checkpoint.resume: {folder} was written with other settings: {'; '.join(changes)}; "
            "a resume continues its optimizer state, random streams and data order under the "
            "settings that made them: set these back, or start over with checkpoint.resume: never"
        )
    stage = job.stages[state.stage_index].model_dump()
    for field in STAGE_LENGTHS:
        if stage.get(field, state.step) < state.step:
            raise SettingsChanged(
                f"stages.{state.stage_index}.{field}: {stage[field]} is below step {state.step} "
                f"of the checkpoint {folder}; set it to at least {state.step}, or start over "
                "with checkpoint.resume: never"
            )


def rewind_metrics(job: JobConfig, run_dir: Path, state: CheckpointState | None) -> int:
    """Drop the metrics.jsonl rows after the resume point (all of them when the run starts over):
    a run killed past its last checkpoint wrote them, and this run writes them again. TensorBoard's
    events of an earlier run are then written again from the rows kept. Returns the rows dropped,
    after saying how many."""
    order = {name: index for index, name in enumerate(job.stage_names)}
    point = (state.stage_index, state.step) if state is not None else None

    def keep(row: dict[str, Any]) -> bool:
        stage, step = order.get(row.get("stage")), row.get("step")
        if point is None or stage is None or not isinstance(step, int):
            return False
        return (stage, step) <= point

    dropped = drop_jsonl_rows(run_dir / "metrics.jsonl", keep)
    if dropped:
        where = (f"after stage {state.stage_name} step {state.step}, where this run resumes"
                 if state is not None else "of an earlier run; this run starts over")  # fmt: skip
        print(f"soar-ray: metrics.jsonl: dropped {dropped} rows {where}")
    if job.logging.tensorboard and job.logging.jsonl and (run_dir / "tensorboard").is_dir():
        # An earlier run's events: written again from the rows kept (and their sample grids).
        rows = rebuild_tensorboard(run_dir, lambda stage, step: keep({"stage": stage,
                                                                      "step": step}))  # fmt: skip
        print(f"soar-ray: tensorboard: rewritten from metrics.jsonl, {rows} rows")
    return dropped


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value; mappings and lists of mappings (the stages) are opened, other lists
    and empty mappings are values."""
    if isinstance(tree, dict) and tree:
        items = list(tree.items())
    elif isinstance(tree, list) and tree and all(isinstance(item, dict) for item in tree):
        items = list(enumerate(tree))
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _may_change(key: str, stage_index: int) -> bool:
    parts = key.split(".")
    if parts[0] == "stages":
        index = int(parts[1])
        field = ".".join(parts[2:])
        return index > stage_index or (index == stage_index and field in STAGE_MAY_CHANGE)
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_MAY_CHANGE)

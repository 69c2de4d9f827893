"""Flow-GRPO epochs through the real stage on an embedded local Ray: learner and rollout worker
pairs (`--pairs`, each sharing a GPU of its own, or the CPU), the jpeg_compressibility reward on
CPU actors, random weights. Every pair gets `--groups` groups an epoch, so the per-GPU work is the
same at any number of pairs (the scaling measurement).

Runs `jobs/grpo.yaml` with benchmark overrides, then prints every epoch's throughput fields from
metrics.jsonl and the median over the epochs after the warm-up ones, and writes the medians with
the shape and the per-GPU epoch rate to OUT/result.json. Used by `benchmarks/gpu_perf.sh`
(SD3.5-Medium shape on H200s); on a laptop CPU:

    python benchmarks/bench_grpo_epoch.py --preset tiny --resolution 64 --precision fp32 \
        --gpus 0 --group-size 4 --groups 2 --batch-size 2 --epochs 2 --warmup 1 --cpus 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import time
from pathlib import Path

FIELDS = ("sampling_images_per_s", "scoring_images_per_s", "training_images_per_s",
          "epoch_images_per_s", "train_seconds", "sample_wait_seconds", "overlap_seconds",
          "gpu_peak_memory_gib", "num_trained_samples", "reward_mean", "kl",
          "staleness")  # fmt: skip
PROMPTS = [
    "a photo of a red bicycle leaning against a brick wall",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up of a cat sleeping on a wooden table",
    "a city street at night in the rain, neon signs",
    "a bowl of ramen with chopsticks, studio lighting",
    "an astronaut riding a horse on the moon",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd35-medium")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument(
        "--gpus",
        type=float,
        default=1.0,
        help="GPUs of the learner + rollout worker pair (each takes half)",
    )
    parser.add_argument(
        "--cpus", type=float, default=4, help="CPUs of the learner and of the worker"
    )
    parser.add_argument("--pairs", type=int, default=1,
                        help="learner + rollout worker pairs (data-parallel learners)")  # fmt: skip
    parser.add_argument("--reward-actors", type=int, default=2)
    parser.add_argument("--reward-cpus", type=float, default=2)
    parser.add_argument("--steps", type=int, default=10, help="SDE steps T")
    parser.add_argument("--group-size", type=int, default=24)
    parser.add_argument("--groups", type=int, default=2, help="groups (prompts) per epoch and pair")
    parser.add_argument("--batch-size", type=int, default=9, help="sample and train batch")
    parser.add_argument("--updates", type=int, default=2, help="optimizer updates per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-staleness", type=int, default=0,
                        help="epochs sampled ahead of training (0: on-policy)")  # fmt: skip
    parser.add_argument("--checkpointing", default="true",
                        help="deepspeed.activation_checkpointing: true, false or N blocks")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the learner's and the rollout worker's MMDiT blocks")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1, help="epochs left out of the median")
    parser.add_argument("--out", default="/tmp/grpo-bench")
    parser.add_argument("--dry-run", action="store_true", help="validate the overrides only")
    args = parser.parse_args()

    out = Path(args.out)
    prompts = out.parent / f"{out.name}-prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(PROMPTS) + "\n")
    half = args.gpus / 2
    overrides = [
        f"output_dir={out}", "model.pretrained=null", f"model.preset={args.preset}",
        f"model.resolution={args.resolution}", "model.t5_max_length=77",
        f"data.prompts.path={prompts}", "data.prompts.kind=text", "data.eval_prompts=null",
        "stages.0.rewards={jpeg_compressibility: 1.0}", "stages.0.eval_every=0",
        f"stages.0.num_epochs={args.epochs}", f"stages.0.num_sampling_steps={args.steps}",
        "stages.0.timestep_fraction=0.99", f"stages.0.group_size={args.group_size}",
        f"stages.0.num_groups_per_epoch={args.groups * args.pairs}",
        f"stages.0.sample_batch_size={args.batch_size}",
        f"stages.0.train_batch_size={args.batch_size}",
        f"stages.0.num_updates_per_epoch={args.updates}", "stages.0.checkpoint_every=1000",
        f"stages.0.max_staleness={args.max_staleness}",
        f"cluster.num_learners={args.pairs}", f"cluster.gpus_per_learner={half}",
        f"cluster.num_rollout_workers={args.pairs}", f"cluster.gpus_per_rollout_worker={half}",
        f"cluster.colocate_rollout_with_learners={'true' if half else 'false'}",
        f"cluster.cpus_per_learner={args.cpus}", f"cluster.cpus_per_rollout_worker={args.cpus}",
        f"cluster.reward_actors={{jpeg_compressibility: {{num_actors: {args.reward_actors}, "
        f"num_cpus: {args.reward_cpus}}}}}",
        "checkpoint.every=1000", "checkpoint.resume=never", "logging.sample_every=0",
        "logging.progress_bar=false", "logging.tensorboard=false",
        f"deepspeed.precision={args.precision}", f"deepspeed.zero_stage={args.zero_stage}",
        f"deepspeed.activation_checkpointing={args.checkpointing}",
        f"deepspeed.compile_blocks={str(args.compile).lower()}",
        f"cluster.compile_rollout_blocks={str(args.compile).lower()}",
    ]  # fmt: skip
    from soar_ray.config import load_job

    job = load_job("jobs/grpo.yaml", overrides)
    stage = job.stages[0]
    print("overrides:", " ".join(overrides))
    print(f"shape: {args.pairs} learner + rollout worker pair(s), {args.preset} "
          f"{args.resolution} px, T={stage.num_sampling_steps} "
          f"(trains {int(stage.num_sampling_steps * stage.timestep_fraction)}), "
          f"G={stage.group_size} x {stage.num_groups_per_epoch} groups, "
          f"sample/train batch {stage.sample_batch_size}/{stage.train_batch_size}, "
          f"LoRA r{stage.lora.r} (enabled {stage.lora.enabled}), "
          f"{job.deepspeed.precision} ZeRO-{job.deepspeed.zero_stage}, "
          f"activation checkpointing {job.deepspeed.activation_checkpointing}, compiled blocks "
          f"{job.deepspeed.compile_blocks}")  # fmt: skip
    if args.dry_run:
        return
    if out.exists():
        shutil.rmtree(out)

    import ray
    from bench_soar_stage import device_name

    from soar_ray.stages.pipeline import run_pipeline

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    begin = time.perf_counter()
    try:
        run_pipeline(job, job.output_path)
    finally:
        ray.shutdown()
    print(f"pipeline wall seconds (actor start, model build, epochs, export): "
          f"{time.perf_counter() - begin:.1f}")  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        print("epoch", row.get("step"), {k: round(row[k], 4) for k in FIELDS if k in row})
    measured = rows[args.warmup :] or rows
    medians = {k: statistics.median(r[k] for r in measured) for k in FIELDS
               if all(k in r for r in measured)}  # fmt: skip
    print(f"median over epochs {[r.get('step') for r in measured]}:",
          {k: round(v, 4) for k, v in medians.items()})  # fmt: skip
    gpus = args.gpus * args.pairs
    result = {
        "date": str(datetime.date.today()), "device": device_name(), "preset": args.preset,
        "resolution": args.resolution, "text_tokens": 77 + job.model.t5_max_length, "pairs": args.pairs, "gpus": gpus,
        "group_size": args.group_size, "groups_per_pair": args.groups,
        "batch": args.batch_size, "checkpointing": args.checkpointing, "compile": args.compile,
        "epochs_measured": [r.get("step") for r in measured], **medians,
        "epoch_images_per_s_per_gpu": medians["epoch_images_per_s"] / gpus if gpus else None,
    }  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

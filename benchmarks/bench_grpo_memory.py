"""The largest Flow-GRPO micro-batch one learner holds: the real GRPO update (`Learner.train` of a
`jobs/grpo.yaml` learner: LoRA, the clipped policy loss and the KL to the adapters-off reference,
one backward per trained step) on random trajectories at the preset's shapes, at growing
micro-batch sizes, two epochs each (the second has the optimizer state), until one runs out of
device memory. Prints a markdown table (batch, peak GiB, epoch s) and writes memory.json to --out.

    python benchmarks/bench_grpo_memory.py --preset sd35-medium --resolution 512 --engine zero2 \\
        --checkpointing false --batch-sizes 9,18,36 --out /tmp/grpo-mem
    python benchmarks/bench_grpo_memory.py --preset tiny --resolution 64 --precision fp32 \\
        --batch-sizes 1,2 --out /tmp/grpo-mem   # CPU: the same code

One rank; the rollout worker's memory (sampling, text encoders, VAE) is not part of it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import parse_search, print_rows, search  # noqa: E402
from bench_soar_stage import device_name, random_encoders  # noqa: E402
from profile_soar_step import DEVICE, add_step_arguments, one_learner  # noqa: E402

from soar_ray.config import load_job  # noqa: E402
from soar_ray.models import get_preset  # noqa: E402
from soar_ray.workers.grpo import GrpoPlan, MicroBatch, Trajectories, UpdatePlan  # noqa: E402


def make_job(args: argparse.Namespace, batch: int):
    """jobs/grpo.yaml (SPEC §3 values) at the benchmark's shape, one learner, one update of one
    micro-batch of `batch` images an epoch."""
    engine = args.engine
    return load_job("jobs/grpo.yaml", [
        f"output_dir={args.out}", "model.pretrained=null", f"model.preset={args.preset}",
        f"model.resolution={args.resolution}", f"model.t5_max_length={args.t5_tokens}",
        "data.prompts.path=jobs/prompts/tiny.txt", "data.prompts.kind=text",
        "data.eval_prompts=null", "stages.0.rewards={jpeg_compressibility: 1.0}",
        f"stages.0.num_sampling_steps={args.steps}", "stages.0.timestep_fraction=0.99",
        f"stages.0.group_size={batch}", "stages.0.num_groups_per_epoch=1",
        f"stages.0.sample_batch_size={batch}", f"stages.0.train_batch_size={batch}",
        "stages.0.num_updates_per_epoch=1", "stages.0.num_inner_epochs=1",
        f"stages.0.lora.r={args.lora_rank}", "stages.0.eval_every=0",
        "cluster.num_learners=1", f"cluster.gpus_per_learner={int(DEVICE == 'cuda')}",
        "cluster.cpus_per_learner=1", "cluster.num_rollout_workers=1",
        "cluster.colocate_rollout_with_learners=false", "cluster.gpus_per_rollout_worker=0",
        "cluster.cpus_per_rollout_worker=1",
        "cluster.reward_actors={jpeg_compressibility: {num_actors: 1, num_cpus: 1}}",
        "cluster.compile_rollout_blocks=false",
        f"deepspeed.precision={args.precision}",
        f"deepspeed.zero_stage={int(engine.removeprefix('zero')) if engine != 'local' else 0}",
        f"deepspeed.enabled={str(engine != 'local').lower()}",
        f"deepspeed.activation_checkpointing={args.checkpointing}",
        f"deepspeed.compile_blocks={str(args.compile).lower()}", "logging.sample_every=0",
    ])  # fmt: skip


def random_trajectories(args: argparse.Namespace, batch: int) -> Trajectories:
    """`batch` trajectories of T steps of random latents, log-probs and prompt embeddings."""
    preset = get_preset(args.preset)
    channels = preset.vae["latent_channels"]
    side = args.resolution // 2 ** (len(preset.vae["block_out_channels"]) - 1)
    _, encode_prompts = random_encoders(args.preset, args.t5_tokens, 0)
    generator = torch.Generator().manual_seed(0)
    return Trajectories(
        latents=torch.randn(batch, args.steps + 1, channels, side, side, generator=generator),
        log_probs=torch.zeros(batch, args.steps),
        cond=encode_prompts(["prompt"] * batch), uncond=encode_prompts([""]), version=0,
    )  # fmt: skip


def one_update(batch: int) -> GrpoPlan:
    """One update of one micro-batch: every row of the trajectories, advantages +-1."""
    rows = tuple((0, i) for i in range(batch))
    advantages = tuple(1.0 if i % 2 else -1.0 for i in range(batch))
    return GrpoPlan((UpdatePlan((MicroBatch(rows, advantages),), batch),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.set_defaults(t5_tokens=77)  # Flow-GRPO's 77 T5 tokens: 154 in all
    parser.add_argument("--steps", type=int, default=10, help="SDE steps T (trains 0.99 T)")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--batch-sizes", default="9,18,27,36")
    args, sizes = parse_search(parser)
    # The engine's accumulation counts one backward per trained step of one micro-batch, whatever
    # its size: one job (at the largest batch) serves every smaller one.
    job = make_job(args, sizes[-1])
    learner = one_learner(job, args.engine)
    trajectories = random_trajectories(args, sizes[-1])
    rows = search(learner, sizes, lambda size: (one_update(size), trajectories))
    stage = job.stages[0]
    result = {
        "date": str(datetime.date.today()), "device": device_name(), "torch": torch.__version__,
        "preset": args.preset, "resolution": args.resolution, "text_tokens": 77 + args.t5_tokens,
        "steps": args.steps, "trained_steps": learner.step.num_timesteps,
        "lora_rank": stage.lora.r if stage.lora.enabled else None, "engine": args.engine,
        "precision": args.precision, "checkpointing": args.checkpointing, "compile": args.compile,
        "largest_batch": max((r["batch"] for r in rows if not r.get("out_of_memory")), default=0),
        "rows": rows,
    }  # fmt: skip
    (args.out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['device']}, GRPO learner, {args.preset} {args.resolution} px, "
          f"{77 + args.t5_tokens} text tokens, {result['trained_steps']} trained steps, LoRA "
          f"r{args.lora_rank}, {args.engine}, checkpointing {args.checkpointing}")  # fmt: skip
    print_rows(rows, "micro-batch", "update s")


if __name__ == "__main__":
    main()

"""SOAR stage throughput on Ray: learner step time and peak GPU memory per learner.

Runs the real stage (placement group, DeepSpeed ZeRO learner group, colocated SOAR steps) on a
latent cache of random latents and text embeddings at the preset's shapes, so no checkpoint or
text encoder is needed and the learners hold the transformer only. Prints a markdown table.

    python benchmarks/bench_soar_stage.py --preset tiny --gpus-per-learner 0 --precision fp32
    python benchmarks/bench_soar_stage.py --preset sd35-medium --num-learners 2 --resolution 512
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
from pathlib import Path

import ray
import torch

from soar_ray.build import build_dataset, model_identity
from soar_ray.config import load_job
from soar_ray.data import write_latent_cache
from soar_ray.models import get_preset
from soar_ray.stages.pipeline import run_pipeline


def random_encoders(preset_name: str, t5_length: int, seed: int):
    """encode_images / encode_prompts stand-ins producing random tensors of the preset's shapes."""
    preset = get_preset(preset_name)
    generator = torch.Generator().manual_seed(seed)
    joint, pooled = (
        preset.transformer["joint_attention_dim"],
        preset.transformer["pooled_projection_dim"],
    )
    channels = preset.vae["latent_channels"]
    factor = 2 ** (len(preset.vae["block_out_channels"]) - 1)

    def encode_images(pixels):
        b, _, h, w = pixels.shape
        return torch.randn(b, channels, h // factor, w // factor, generator=generator)

    def encode_prompts(prompts):
        b = len(prompts)
        return {
            "prompt_embeds": torch.randn(b, 77 + t5_length, joint, generator=generator),
            "pooled_embeds": torch.randn(b, pooled, generator=generator),
        }

    return encode_images, encode_prompts


def run(args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / f"{args.preset}-z{args.zero_stage}-{args.aux_eval}-{args.num_learners}x"
    num_images = args.batch_size * args.num_learners * 2
    overrides = [
        f"output_dir={run_dir}", f"model.preset={args.preset}", f"model.resolution={args.resolution}",
        f"data.synthetic.num_images={num_images}",
        f"data.synthetic.resolutions=[[{args.resolution}, {args.resolution}]]",
        f"data.batch_size={args.batch_size}", f"cluster.num_learners={args.num_learners}",
        f"cluster.gpus_per_learner={args.gpus_per_learner}", "cluster.num_rollout_workers=0",
        f"cluster.cpus_per_learner={args.cpus_per_learner}",
        f"deepspeed.zero_stage={args.zero_stage}", f"deepspeed.precision={args.precision}",
        f"deepspeed.activation_checkpointing={args.checkpointing}",
        f"deepspeed.compile_blocks={str(args.compile).lower()}",
        f"stages.0.num_steps={args.steps}", f"stages.0.aux_eval={args.aux_eval}",
        "logging.sample_every=0", "logging.tensorboard=false", "logging.progress_bar=false",
        f"checkpoint.every={10**6}", "checkpoint.resume=never", "model.dtype=fp32",
    ]  # fmt: skip
    image_job = load_job("jobs/tiny.yaml", overrides)
    cache_dir = run_dir / "cache"
    encode_images, encode_prompts = random_encoders(args.preset, image_job.model.t5_max_length, 0)
    cache_job = load_job("jobs/tiny.yaml", [*overrides, "data.source=cache",
                                            f"data.cache_dir={cache_dir}"])  # fmt: skip
    write_latent_cache(build_dataset(image_job), cache_dir, encode_images=encode_images,
                       encode_prompts=encode_prompts, model_id=model_identity(cache_job),
                       batch_size=8, dtype="float16", overwrite=True)  # fmt: skip
    run_pipeline(cache_job, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup :]
    global_batch = args.batch_size * args.num_learners
    seconds = [global_batch / r["samples_per_s"] for r in timed]
    return {
        "preset": args.preset, "learners": args.num_learners, "zero": args.zero_stage,
        "precision": args.precision, "aux_eval": args.aux_eval, "batch_per_learner": args.batch_size,
        "resolution": args.resolution, "step_s": statistics.median(seconds),
        "images_per_s": global_batch / statistics.median(seconds),
        "peak_gib": max((r.get("gpu_peak_memory_gib", float("nan")) for r in rows), default=float("nan")),
        "aux_points": rows[-1]["aux_points_per_sample"],
    }  # fmt: skip


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return "unknown CPU"


def device_name() -> str:
    """This process's first GPU by name, or the CPU's model and cores where it sees none."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--num-learners", type=int, default=2)
    parser.add_argument("--gpus-per-learner", type=float, default=1.0)
    parser.add_argument("--cpus-per-learner", type=float, default=1.0)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--aux-eval", default="fused", choices=["fused", "sequential"])
    parser.add_argument("--checkpointing", default="true",
                        help="activation checkpointing: true (every block), false, or N: the "
                        "first N blocks")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the MMDiT blocks (deepspeed.compile_blocks)")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_soar_"))
    result = run(args, out)
    device = torch.cuda.get_device_name(0) if args.gpus_per_learner > 0 else cpu_name()
    print(f"# SOAR stage benchmark, {datetime.date.today()}, {device}, torch {torch.__version__}")
    print("| " + " | ".join(result) + " |")
    print("|" + "---|" * len(result))
    print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v)
                            for v in result.values()) + " |")  # fmt: skip
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

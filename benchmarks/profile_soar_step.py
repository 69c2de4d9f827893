"""Where the time of one SOAR learner step goes: the real step (`Learner.train` on a batch from a
latent cache of random latents and text embeddings at the preset's shapes) in this process, timed,
then under torch.profiler. The step's phases are named ranges (`soar.rollout`: the no-grad CFG
rollout and re-noising; `soar.forward`: the graded forward of the main and aux points;
`soar.backward`, whose kernels run on autograd's thread and so fall outside every range;
`soar.optimizer`: the engine's step, clipping included; the EMA update is left outside), so the table gives
the device time of each, what is left between them (host syncs, launches), and the busiest
kernels.

    python benchmarks/profile_soar_step.py --preset sd35-medium --resolution 512 --batch-size 4 \\
        --engine zero2 --out /tmp/profile-z2
    python benchmarks/profile_soar_step.py --preset tiny --engine local   # CPU: the same code

`--engine local` is the plain-torch LocalEngine; `zero0` .. `zero3` the DeepSpeed engine on a
one-rank process group, as a one-learner run has it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_soar_stage import device_name, random_encoders  # noqa: E402

from soar_ray.build import (
    build_dataset,
    build_learner,
    build_sampler,
    build_sd3,
    learner_components,
    model_identity,
)
from soar_ray.cluster.session import free_port
from soar_ray.config import load_job
from soar_ray.data import write_latent_cache
from soar_ray.data.loader import iter_batches

PHASES = ("soar.rollout", "soar.forward", "soar.backward", "soar.optimizer")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_job(args: argparse.Namespace, out: Path):
    """The job (a latent cache of random tensors at the preset's shapes, written once)."""
    overrides = [
        f"output_dir={out}", f"model.preset={args.preset}", f"model.resolution={args.resolution}",
        f"model.t5_max_length={args.t5_tokens}", "model.dtype=fp32",
        f"data.synthetic.num_images={args.batch_size}",
        f"data.synthetic.resolutions=[[{args.resolution}, {args.resolution}]]",
        f"data.batch_size={args.batch_size}", "cluster.num_rollout_workers=0",
        f"cluster.gpus_per_learner={int(DEVICE == 'cuda')}",
        f"deepspeed.precision={args.precision}",
        f"deepspeed.zero_stage={int(args.engine.removeprefix('zero')) if args.engine != 'local' else 0}",
        f"deepspeed.activation_checkpointing={args.checkpointing}",
        f"deepspeed.compile_blocks={str(args.compile).lower()}",
        f"stages.0.aux_eval={args.aux_eval}", f"stages.0.trajectory_length={args.aux_points}",
        "logging.sample_every=0",
    ]  # fmt: skip
    image_job = load_job("jobs/tiny.yaml", overrides)
    cache_dir = out / "cache"
    cache_job = load_job("jobs/tiny.yaml", [*overrides, "data.source=cache",
                                            f"data.cache_dir={cache_dir}"])  # fmt: skip
    if not (cache_dir / "manifest.json").is_file():
        encode_images, encode_prompts = random_encoders(args.preset, args.t5_tokens, 0)
        write_latent_cache(build_dataset(image_job), cache_dir, encode_images=encode_images,
                           encode_prompts=encode_prompts, model_id=model_identity(cache_job),
                           batch_size=args.batch_size, dtype="float16", overwrite=True)  # fmt: skip
    return cache_job


def one_rank_group() -> None:
    """A one-rank process group on loopback, for the DeepSpeed engine."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    deepspeed.init_distributed(dist_backend="nccl" if DEVICE == "cuda" else "gloo")


def one_learner(job, engine: str):
    """The job's learner on this process's device, its first stage set up: plain torch for
    `local`, else DeepSpeed in a one-rank group."""
    if engine != "local":
        one_rank_group()
    model = build_sd3(job, DEVICE, components=learner_components(job))
    learner = build_learner(job, model, distributed=engine != "local")
    learner.setup_stage(0)
    return learner


def named(fn, name: str):
    """`fn` inside a profiler range called `name`."""
    from torch.profiler import record_function

    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapped


def name_phases(learner) -> None:
    """Profiler ranges around the calls `SoarStep.train` makes (module functions it imported,
    and the engine's methods, replaced on this engine only)."""
    import soar_ray.workers.soar as step_module

    for attribute, name in (("prepare_soar_inputs", "soar.rollout"),
                            ("soar_losses_from_inputs", "soar.forward")):  # fmt: skip
        setattr(step_module, attribute, named(getattr(step_module, attribute), name))
    learner.engine.backward = named(learner.engine.backward, "soar.backward")
    learner.engine.step = named(learner.engine.step, "soar.optimizer")


def phase_table(prof) -> dict[str, float]:
    """Milliseconds (over all profiled steps) of each named phase: the device time of the kernels
    launched inside its range (CPU time without a GPU). The backward runs on autograd's own
    thread, outside any range of this thread: its kernels are in no phase. A range also shows up
    as a GPU-side annotation whose time is its span on the GPU timeline (work queued before it,
    idle gaps): that entry (no CPU time) is left out."""
    totals = {}
    for event in prof.key_averages():
        if event.key in PHASES and event.cpu_time_total > 0:
            value = event.device_time_total if DEVICE == "cuda" else event.cpu_time_total
            totals[event.key] = totals.get(event.key, 0.0) + value / 1e3
    return totals


def host_syncs(step) -> dict[str, int] | None:
    """Where one call of `step` makes the host wait for the GPU (torch's sync debug mode warns at
    each synchronizing call): the count per source line of soar_ray, None without a GPU."""
    if DEVICE != "cuda":
        return None
    import traceback
    import warnings

    counts: dict[str, int] = {}

    def note(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if "/soar_ray/" in f.filename]
        where = f"{frames[-1].filename.split('/soar_ray/')[-1]}:{frames[-1].lineno}" if frames \
            else f"{filename}:{lineno}"  # fmt: skip
        counts[where] = counts.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return counts


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """What `make_job` reads, besides the batch size: the step's shape and engine settings."""
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--t5-tokens", type=int, default=256)
    parser.add_argument("--aux-points", type=int, default=6)
    parser.add_argument("--aux-eval", default="fused", choices=["fused", "sequential"])
    parser.add_argument("--engine", default="local", choices=["local", "zero0", "zero1", "zero2",
                                                              "zero3"])  # fmt: skip
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--checkpointing", default="true",
                        help="activation checkpointing: true (every block), false, or N: the "
                        "first N blocks")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the MMDiT blocks (deepspeed.compile_blocks)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    job = make_job(args, args.out)
    dataset = build_dataset(job)
    batch = next(iter_batches(dataset, [build_sampler(job, dataset, 0, 1)], first_step=0,
                              num_steps=1))[0]  # fmt: skip
    start = time.perf_counter()
    learner = one_learner(job, args.engine)
    name_phases(learner)
    build_s = time.perf_counter() - start
    # Every step's loss and gradient norm, in order: engines and compiled blocks are compared
    # from the first step (same weights, same draws) on, not only at the last.
    trace: list[dict] = []

    def train() -> None:
        metrics = learner.train(batch)
        trace.append({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]})

    for _ in range(args.warmup):
        train()
    syncs = host_syncs(train)
    seconds = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        train()
        sync()
        seconds.append(time.perf_counter() - start)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.profile_steps):
            learner.train(batch)
        sync()
        profiled_ms = (time.perf_counter() - start) * 1e3 / args.profile_steps
    step_ms = statistics.median(seconds) * 1e3
    phases = {k: v / args.profile_steps for k, v in phase_table(prof).items()}
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    result = {
        "date": str(datetime.date.today()), "device": device_name(), "torch": torch.__version__,
        "preset": args.preset, "resolution": args.resolution, "batch": args.batch_size,
        "text_tokens": 77 + args.t5_tokens, "aux_points": args.aux_points, "engine": args.engine,
        "precision": args.precision, "checkpointing": args.checkpointing, "compile": args.compile,
        "aux_eval": args.aux_eval, "build_s": build_s, "step_ms": step_ms,
        "images_per_s": args.batch_size / (step_ms / 1e3), "peak_gib": peak,
        # Under the profiler: the step's wall time, and what the named phases leave of it (on a
        # GPU: the backward's kernels, the EMA, and time the device ran none).
        "profiled_step_ms": profiled_ms, "phase_ms": phases,
        "outside_phases_ms": profiled_ms - sum(phases.values()),
        "loss": trace[-1]["loss"], "trace": trace,
        "host_syncs": syncs,
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    sort = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
    print(table)
    (args.out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "profile_table.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()

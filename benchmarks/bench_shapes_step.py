"""Where a SOAR-stage step of the shapes study goes, at the study's GPU shape: the driver's data
path (the latent cache read by `iter_batches`, as `run_soar_stage` does); the learner's step on a
fixed batch in this process, with the plain-torch LocalEngine and with the DeepSpeed engine the
runs use (ZeRO 0 and 1, one rank); and the whole `soar-ray run` of the same job on a local Ray
(the median step rate from its metrics). `--trace` adds a torch.profiler table of the DeepSpeed
step.

    python benchmarks/bench_shapes_step.py --out /tmp/shapes-bench [--num-images 20000]

Builds a world, the study model with an untrained autoencoder (timing only) and its latent cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_soar_step import DEVICE, one_rank_group, sync  # noqa: E402
from shapes_geneval import PROFILES, Study, job_tree, prepare_cache, soar_stage  # noqa: E402
from shapes_models import autoencoder, save_study_model  # noqa: E402

from soar_ray.data.shapes import make_shapes_set, make_split  # noqa: E402


def time_data(job, num_steps: int) -> float:
    """Batches a second of the driver's data path (cache -> per-rank batches)."""
    from soar_ray.build import build_dataset, build_sampler
    from soar_ray.data.loader import iter_batches

    dataset = build_dataset(job)
    samplers = [build_sampler(job, dataset, 0, 1)]
    batches = iter_batches(dataset, samplers, first_step=0, num_steps=num_steps + 2,
                           num_workers=job.data.num_workers)  # fmt: skip
    next(batches), next(batches)  # workers started
    start = time.perf_counter()
    for _ in range(num_steps):
        next(batches)
    return num_steps / (time.perf_counter() - start)


def time_step(job, num_steps: int, engine: str, trace: bool = False) -> tuple[float, dict]:
    """Steps a second of the learner alone on one batch from the cache, in this process:
    `local` (LocalEngine) or `zero0` / `zero1` (DeepSpeed on a one-rank process group)."""
    from soar_ray.build import build_dataset, build_learner, build_sampler, build_sd3
    from soar_ray.data.loader import iter_batches

    dataset = build_dataset(job)
    batch = next(iter_batches(dataset, [build_sampler(job, dataset, 0, 1)], first_step=0,
                              num_steps=1))[0]  # fmt: skip
    if engine != "local":
        job = job.model_copy(update={"deepspeed": job.deepspeed.model_copy(
            update={"zero_stage": int(engine.removeprefix("zero"))})})  # fmt: skip
    learner = build_learner(job, build_sd3(job, DEVICE), distributed=engine != "local")
    learner.setup_stage(0)
    for _ in range(3):
        learner.train(batch)
    sync()
    start = time.perf_counter()
    for _ in range(num_steps):
        metrics = learner.train(batch)
    sync()
    rate = num_steps / (time.perf_counter() - start)
    if trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(10):
                learner.train(batch)
            sync()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30), flush=True)
    return rate, metrics


def time_run(job, run_dir: Path) -> float:
    """Median steps a second of `soar-ray run` of the job (its metrics' samples_per_s)."""
    from soar_ray.stages.pipeline import run_pipeline

    run_dir.mkdir(parents=True, exist_ok=True)
    run_pipeline(job, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return float(np.median([r["samples_per_s"] for r in rows[2:]])) / job.data.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--run-steps", type=int, default=200, help="steps of the whole run")
    parser.add_argument("--trace", action="store_true", help="profile the DeepSpeed step")
    args = parser.parse_args()
    profile = PROFILES["gpu"]
    study = Study(Path(args.out), profile, split_seed=0)
    world = make_shapes_set(study.world_dir, args.num_images, make_split(0), image_size=32)
    if not (study.model_dir / "model_index.json").is_file():
        save_study_model(autoencoder(profile.model), profile.model, 8, 0, study.model_dir)
    results = {}
    one_rank_group()
    from soar_ray.cluster.session import ray_session
    from soar_ray.config import ClusterConfig, load_job

    for name, lambda_aux, batch in (("sft", 0.0, 256), ("soar", 1.0, 64)):
        stage = soar_stage(profile, args.run_steps, 1e-3, lambda_aux=lambda_aux, cfg=4.5)
        tree = job_tree(study, f"bench-{name}", 0, stage, world, args.run_steps)
        tree["data"]["batch_size"] = batch
        prepare_cache(study, tree, world)
        path = study.root / f"bench-{name}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        job = load_job(path)
        result = {"batch": batch, "data_batches_per_s": time_data(job, args.steps)}
        for engine in ("local", "zero0", "zero1"):
            trace = args.trace and engine == "zero1"
            rate, metrics = time_step(job, args.steps, engine, trace)
            result[f"learner_{engine}_steps_per_s"] = rate
        with ray_session(ClusterConfig()):
            result["run_steps_per_s"] = time_run(job, study.root / f"bench-{name}")
        results[name] = result
        print(name, json.dumps(results[name]), flush=True)
    (Path(args.out) / "bench_step.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

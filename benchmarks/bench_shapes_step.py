"""Where a SOAR-stage step of the shapes study goes: the driver's data path (the latent cache read
by `iter_batches`, as `run_soar_stage` does) against the learner's step on a fixed batch (the
in-process engine, no Ray), at the study's GPU shape.

    python benchmarks/bench_shapes_step.py --out /tmp/shapes-bench [--num-images 20000]

Builds a world, the study model with an untrained autoencoder (timing only) and its latent cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_geneval import PROFILES, Study, job_tree, prepare_cache, soar_stage  # noqa: E402
from shapes_models import autoencoder, save_study_model  # noqa: E402

from soar_ray.data.shapes import make_shapes_set, make_split  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


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


def time_step(job, num_steps: int) -> tuple[float, dict]:
    """Steps a second of the learner alone, on one batch from the cache (in-process engine)."""
    from soar_ray.build import build_dataset, build_learner, build_sampler, build_sd3
    from soar_ray.data.loader import iter_batches

    dataset = build_dataset(job)
    batch = next(iter_batches(dataset, [build_sampler(job, dataset, 0, 1)], first_step=0,
                              num_steps=1))[0]  # fmt: skip
    learner = build_learner(job, build_sd3(job, DEVICE), distributed=False)
    learner.setup_stage(0)
    for _ in range(3):
        learner.train(batch)
    sync()
    start = time.perf_counter()
    for _ in range(num_steps):
        metrics = learner.train(batch)
    sync()
    return num_steps / (time.perf_counter() - start), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    profile = PROFILES["gpu"]
    study = Study(Path(args.out), profile, split_seed=0)
    world = make_shapes_set(study.world_dir, args.num_images, make_split(0), image_size=32)
    if not (study.model_dir / "model_index.json").is_file():
        save_study_model(autoencoder(profile.model), profile.model, 8, 0, study.model_dir)
    results = {}
    for name, lambda_aux, batch in (("sft", 0.0, 256), ("soar", 1.0, 64)):
        stage = soar_stage(profile, 10, 1e-3, lambda_aux=lambda_aux, cfg=4.5)
        tree = job_tree(study, f"bench-{name}", 0, stage, world, 10)
        tree["data"]["batch_size"] = batch
        prepare_cache(study, tree, world)
        path = study.root / f"bench-{name}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        from soar_ray.config import load_job

        job = load_job(path)
        data_rate = time_data(job, args.steps)
        step_rate, metrics = time_step(job, args.steps)
        results[name] = {"batch": batch, "data_batches_per_s": data_rate,
                         "learner_steps_per_s": step_rate, "loss": metrics["loss"]}  # fmt: skip
        print(name, json.dumps(results[name]), flush=True)
    (Path(args.out) / "bench_step.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

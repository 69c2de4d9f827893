"""An evaluation on Ray: the job's placement code reserves rollout workers (no learners: their
GPUs are free) and the reward actors; workers load the transformer, sample the missing images
(saved as each batch arrives, so an interrupted run keeps them), every image is scored, and the
folder gets its scores, summary, grid and gallery."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from soar_ray.cluster.groups import RolloutPool
from soar_ray.cluster.placement import create_topology
from soar_ray.cluster.rewards import RewardPool, merge_outputs
from soar_ray.cluster.session import ray_session
from soar_ray.config import ClusterConfig, JobConfig
from soar_ray.data.prompts import Prompt
from soar_ray.eval.command import SETTINGS_FILE
from soar_ray.eval.report import (
    IMAGE_DIR,
    SCORES_FILE,
    SUMMARY_FILE,
    format_table,
    score_rows,
    summarize,
    write_gallery,
    write_grid,
    write_scores,
    write_summary,
)
from soar_ray.eval.sampling import (
    EvalBatch,
    EvalItem,
    SamplingSettings,
    eval_items,
    submit_eval,
)
from soar_ray.workers.rollout import RolloutWorker


def eval_cluster(cluster: ClusterConfig, num_workers: int) -> ClusterConfig:
    """The job's cluster with no learners and `num_workers` rollout workers in bundles of their
    own (sized `gpus_per_rollout_worker`, `cpus_per_rollout_worker`)."""
    return cluster.model_copy(update={
        "num_learners": 0, "num_rollout_workers": num_workers,
        "colocate_rollout_with_learners": False,
    })  # fmt: skip


def save_png(path: Path, image: np.ndarray) -> None:
    """Write atomically: a PNG on disk is always whole, so a re-run can trust it."""
    partial = path.with_name(path.name + ".partial")
    Image.fromarray(image).save(partial, format="PNG")
    os.replace(partial, path)


class EvalSession:
    """Rollout workers and reward actors of evaluations, kept for as many as are run: a study
    that evaluates many checkpoints pays the actors' start-up once. Needs a connected Ray."""

    def __init__(self, job: JobConfig, rewards: list[str], num_workers: int) -> None:
        self.cluster = eval_cluster(job.cluster, num_workers)
        self.job = job.model_copy(update={"cluster": self.cluster})
        self.rewards = list(rewards)
        # Own names, so a session can live beside a training run (a study evaluating its runs).
        self.topology = create_topology(self.cluster, self.rewards, name="soar_ray-eval")
        self.rollouts: RolloutPool | None = None
        self.pool: RewardPool | None = None
        try:
            self.pool = RewardPool(dict.fromkeys(self.rewards, 1.0), job.rewards, self.cluster,
                                   actor_prefix="eval-reward", topology=self.topology)  # fmt: skip
            if num_workers:
                self.rollouts = RolloutPool(self.job, self.topology, prefix="eval-rollout")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.rollouts is not None:
            self.rollouts.kill()
        self.topology.remove()

    def __enter__(self) -> EvalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def evaluate(self, prompts: list[Prompt], settings: dict[str, Any], out: Path,
                 batch_size: int) -> dict[str, Any]:  # fmt: skip
        """Sample the missing images of `settings` into `out`, score every image, write the
        report; returns the summary."""
        unknown = sorted(set(settings["rewards"]) - set(self.rewards))
        if unknown:
            raise ValueError(f"EvalSession: no reward actors for {unknown}")
        images_dir = out / IMAGE_DIR
        images_dir.mkdir(parents=True, exist_ok=True)
        (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        todo, made = missing_items(out, prompts, settings)
        weights = dict.fromkeys(settings["rewards"], 1.0)
        print(f"soar-ray: eval of {settings['transformer']}: {len(prompts)} prompts x "
              f"{settings['images_per_prompt']} images ({len(made)} already made), rewards "
              f"{settings['rewards']}, {len(self.rollouts or [])} rollout workers")  # fmt: skip
        rescored = _score_made(self.pool, prompts, made, images_dir, batch_size, weights)
        batches: list[EvalBatch] = []
        if todo:
            if self.rollouts is None:
                raise ValueError("EvalSession: images to make but no rollout workers")
            # A restarted worker loads the evaluated weights again before it samples.
            self.rollouts.restore_steps = lambda: [(RolloutWorker.load_transformer,
                                                    (settings["transformer"],))]  # fmt: skip
            self.rollouts.call(RolloutWorker.load_transformer, settings["transformer"])
            sampling = SamplingSettings(settings["num_steps"], settings["guidance"],
                                        settings["resolution"])  # fmt: skip
            with tqdm(total=len(todo), unit="image", desc="sampling",
                      disable=not self.job.logging.progress_bar) as bar:  # fmt: skip

                def save(batch: EvalBatch, images: np.ndarray) -> None:
                    for item, image in zip(batch.items, images):
                        save_png(images_dir / f"{item.name}.png", image)
                    bar.update(len(batch.items))

                batches = submit_eval(self.rollouts, self.pool, prompts, todo, sampling,
                                      batch_size, weights, on_images=save)  # fmt: skip
        order = [item for batch in batches for item in batch.items]
        order += [item for chunk, _ in rescored for item in chunk]
        outputs = [batch.scores.result() for batch in batches]
        outputs += [handle.result() for _, handle in rescored]
        return _report(out, prompts, order, merge_outputs(outputs), settings)


def missing_items(out: Path, prompts: list[Prompt], settings: dict[str, Any]):
    """(items to sample, items whose image `out` already holds)."""
    items = eval_items(len(prompts), settings["images_per_prompt"], settings["seed"])
    exists = [(out / IMAGE_DIR / f"{item.name}.png").is_file() for item in items]
    return ([i for i, e in zip(items, exists) if not e], [i for i, e in zip(items, exists) if e])


def run_eval(
    job: JobConfig,
    prompts: list[Prompt],
    settings: dict[str, Any],
    out: Path,
    batch_size: int,
    num_workers: int,
) -> dict[str, Any]:
    """One evaluation in its own session (workers only when images are missing)."""
    todo, _ = missing_items(out, prompts, settings)
    workers = num_workers if todo else 0
    with ray_session(job.cluster), EvalSession(job, settings["rewards"], workers) as session:
        return session.evaluate(prompts, settings, out, batch_size)


def _score_made(pool, prompts, made, images_dir, batch_size, weights) -> list[tuple[list, Any]]:
    """Score the images an earlier run made (read from disk), in batches."""
    handles = []
    for start in range(0, len(made), batch_size):
        chunk: list[EvalItem] = made[start : start + batch_size]
        images = [np.asarray(Image.open(images_dir / f"{item.name}.png").convert("RGB"))
                  for item in chunk]  # fmt: skip
        texts = [prompts[item.prompt_index].text for item in chunk]
        metadata = [prompts[item.prompt_index].metadata or None for item in chunk]
        handles.append((chunk, pool.submit(images, texts, metadata, weights=weights)))
    return handles


def _report(out, prompts, order, output, settings) -> dict[str, Any]:
    rows = sorted(score_rows(prompts, order, output),
                  key=lambda row: (row["prompt_index"], row["sample"]))  # fmt: skip
    columns = list(output.components)
    write_scores(rows, out / SCORES_FILE)
    summary = summarize(rows, columns)
    write_summary(summary, settings, out / SUMMARY_FILE)
    print(format_table(summary))
    grid = write_grid(out, rows, columns[0])
    gallery = write_gallery(out, rows, columns, f"soar-ray eval: {settings['transformer']}")
    print(f"soar-ray: scores {out / SCORES_FILE}, summary {out / SUMMARY_FILE}, grid {grid}, "
          f"gallery {gallery}")  # fmt: skip
    return summary

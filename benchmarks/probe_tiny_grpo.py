"""Can Flow-GRPO move a reward on the tiny random-weight preset? A probe, in one process on CPU.

Runs the GRPO epoch loop of soar_ray (the rollout worker's SDE sampling, `plan_epoch`, the
learner's PPO update on the in-process engine) without Ray, for a job file and overrides, with
either a registered reward (default `jpeg_compressibility`) or `--latent-probe`: the mean of the
final latent's first channel, a quantity the transformer controls directly (no VAE in between).
Prints the mean reward of every epoch. Also `--direct`: the same sampler made differentiable and
the decoded images' total variation minimised by plain gradient descent, to see how far the model
can move JPEG size when it is told the exact gradient.

    python benchmarks/probe_tiny_grpo.py --epochs 20 --set stages.0.group_size=8
    python benchmarks/probe_tiny_grpo.py --latent-probe --epochs 10
    python benchmarks/probe_tiny_grpo.py --direct --epochs 40
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import rewards
from soar_ray.algo.flow import guided_velocity, make_inference_grid
from soar_ray.algo.grpo import group_advantages
from soar_ray.build import build_learner, build_sd3
from soar_ray.config import load_job
from soar_ray.data.prompts import load_prompt_set
from soar_ray.metrics import to_uint8_images
from soar_ray.stages.grpo import derived_seed, epoch_prompts, plan_epoch
from soar_ray.workers.grpo import SampleRequest
from soar_ray.workers.rollout import RolloutWorker


def grpo_probe(job, epochs: int, latent_probe: bool) -> list[float]:
    stage = job.stages[0]
    reward = rewards.load(next(iter(stage.rewards)), device="cpu")
    worker = RolloutWorker(job, build_sd3(job), seed=0)
    worker.set_stage(0)
    learner = build_learner(job, build_sd3(job), distributed=False)
    learner.setup_stage(0)
    prompts = [p.text for p in load_prompt_set(job.data.prompts.path, job.data.prompts.kind)]
    means = []
    for epoch in range(1, epochs + 1):
        chosen = epoch_prompts(len(prompts), stage.num_groups_per_epoch, derived_seed(1, epoch))
        per_image = [prompts[i] for i in chosen for _ in range(stage.group_size)]
        batches, scores = [], []
        for k in range(0, len(per_image), stage.sample_batch_size):
            texts = per_image[k : k + stage.sample_batch_size]
            trajectories, images, _ = worker.rollout(
                SampleRequest(texts, derived_seed(2, epoch, k))
            )
            batches.append(trajectories)
            if latent_probe:
                scores.append(trajectories.latents[:, -1, 0].mean((1, 2)).double().numpy())
            else:
                scores.append(reward.score(list(images), texts).scores)
        scores = np.concatenate(scores)
        means.append(float(scores.mean()))
        group_ids = np.repeat(np.arange(len(chosen)), stage.group_size)
        advantages, keep = group_advantages(torch.from_numpy(scores), torch.from_numpy(group_ids),
                                            global_std=stage.global_std,
                                            adv_clip_max=stage.adv_clip_max)  # fmt: skip
        used = np.flatnonzero(keep.numpy())
        rows = [(int(i) // stage.sample_batch_size, int(i) % stage.sample_batch_size) for i in used]
        [(plan, calls)] = plan_epoch(rows, advantages[keep].tolist(), stage, 1, seed=epoch)
        learner.train(plan, *[batches[c] for c in calls])
        worker.load_weights(learner.export_weights(), epoch)
        print(f"epoch {epoch:3d}  mean reward {means[-1]:.4f}", flush=True)
    return means


def direct_probe(job, steps: int) -> list[float]:
    """Total variation of decoded ODE samples minimised with exact gradients (Adam, lr 1e-3)."""
    stage = job.stages[0]
    model = build_sd3(job)
    reward = rewards.load("jpeg_compressibility", device="cpu")
    grid = make_inference_grid(3.0, stage.num_sampling_steps)
    num = 16
    cond, uncond = (
        model.encode_prompts(["a red circle on a blue background"] * num),
        model.uncond(num),
    )
    optimizer = torch.optim.Adam(model.transformer.parameters(), lr=1e-3)
    latent = job.model.resolution // model.vae_scale_factor
    means = []
    for step in range(steps + 1):
        x = torch.randn(num, model.latent_channels, latent, latent,
                        generator=torch.Generator().manual_seed(step))  # fmt: skip
        for i in range(grid.num_steps):
            timestep = grid.timesteps[i].expand(num)
            v = guided_velocity(model.denoise, x, timestep, cond, uncond, stage.cfg_scale)
            x = x + v * (grid.sigmas[i + 1] - grid.sigmas[i])
        z = x / model.vae.config.scaling_factor + model.vae.config.shift_factor
        pixels = model.vae.decode(z, return_dict=False)[0].clamp(-1, 1)
        tv = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean() + (
            pixels[..., 1:] - pixels[..., :-1]
        ).abs().mean()
        optimizer.zero_grad()
        tv.backward()
        optimizer.step()
        images = to_uint8_images(pixels.detach())
        means.append(float(reward.score(list(images), ["p"] * num).scores.mean()))
        print(f"step {step:3d}  total variation {float(tv):.4f}  jpeg_compressibility "
              f"{means[-1]:.4f}", flush=True)  # fmt: skip
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default="jobs/tiny_grpo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--latent-probe", action="store_true")
    parser.add_argument("--direct", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    job = load_job(args.job, ["cluster.num_learners=1", *args.overrides])
    start = time.perf_counter()
    if args.direct:
        means = direct_probe(job, args.epochs)
    else:
        means = grpo_probe(job, args.epochs, args.latent_probe)
    first, last = np.mean(means[:4]), np.mean(means[-4:])
    print(f"first 4 {first:.4f}  last 4 {last:.4f}  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

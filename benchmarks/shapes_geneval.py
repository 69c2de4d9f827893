"""SFT vs SOAR vs SOAR -> Flow-GRPO in the shapes world, scored exactly (`shapes_geneval`).

    python benchmarks/shapes_geneval.py --out runs/shapes                 # the GPU protocol
    python benchmarks/shapes_geneval.py --out runs/shapes-cpu --profile cpu   # pipeline check

For every split seed: write the world (training images of the seen compositions, GenEval-format
prompt sets of seen and held-out compositions), train its autoencoder, save the study's SD3
folder and encode the latent cache (`soar-ray prepare`); pre-train a small MMDiT from scratch with
flow matching (a SOAR stage with lambda_aux 0), then post-train that base with SFT and with SOAR
at rollout CFG 1, 2 and 4.5 over several seeds at equal steps and batch, plus SFT at SOAR's
compute (the same steps at a batch as many times larger as a SOAR sample costs), then Flow-GRPO
with `shapes_geneval` from the SOAR (CFG 4.5) and the SFT result. Every checkpoint (EMA weights) is
evaluated with `soar-ray eval`'s code on the seen and held-out prompts (40 ODE steps; the final
ones at 10 steps too), and a Frechet distance to rendered held-out images is taken on the study
autoencoder's latent features.

Every run is a job file in its folder (`soar-ray run` reruns it) and runs as a driver process of
its own on the study's Ray (`--parallel` at a time, each as soon as the run it starts from has
trained), evaluating each checkpoint as it is written in an evaluation session of its own, then
its output, and writes `result.json`; its output goes to `driver.log`. Finished runs are skipped,
so the command resumes.
`results.json` gathers every number as runs finish; `--phases report` draws the plots (needs
matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_models import ModelShape, reconstruct, save_study_model, train_autoencoder  # noqa: E402
from shapes_report import method_of  # noqa: E402

from soar_ray.data.shapes import make_shapes_set, make_split, render, scene_for  # noqa: E402


@dataclass(frozen=True)
class Profile:
    """Every size of the protocol."""

    split_seeds: tuple[int, ...] = (0, 1)
    seeds: tuple[int, ...] = (0, 1, 2)
    image_size: int = 32
    num_images: int = 20000
    num_eval_per_tag: int = 16
    images_per_prompt: int = 4
    model: ModelShape = ModelShape()
    autoencoder_steps: int = 1500
    autoencoder_batch: int = 256
    pretrain_steps: int = 1500
    pretrain_batch: int = 256
    pretrain_lr: float = 1e-3
    batch_size: int = 64
    posttrain_steps: int = 400
    posttrain_lr: float = 2e-4
    eval_every: int = 100
    soar_cfgs: tuple[float, ...] = (1.0, 2.0, 4.5)
    trajectory_length: int = 6
    grpo_epochs: int = 100
    grpo_eval_every: int = 25
    gpu: bool = True
    parallel_per_device: int = 4
    """Runs at a time per GPU (per 4 CPUs without GPUs); `--parallel` overrides."""
    eval_steps: tuple[int, ...] = (40, 10)
    eval_batch: int = 512
    """Images a sampling batch: a whole prompt set at once (a tiny model is launch-bound)."""
    compile: bool = False
    """torch.compile the blocks of every learner and rollout worker (fewer kernel launches)."""


PROFILES = {
    "gpu": Profile(),
    # A pipeline check on a laptop: every phase, tiny sizes.
    "cpu": Profile(
        split_seeds=(0,),
        seeds=(0,),
        num_images=256,
        num_eval_per_tag=2,
        images_per_prompt=1,
        model=ModelShape(vae_channels=(16, 32, 32), num_layers=2, num_heads=2, head_dim=16),
        autoencoder_steps=30,
        autoencoder_batch=32,
        pretrain_steps=6,
        pretrain_batch=4,
        batch_size=4,
        posttrain_steps=4,
        eval_every=2,
        soar_cfgs=(4.5,),
        trajectory_length=2,
        grpo_epochs=2,
        grpo_eval_every=2,
        gpu=False,
        parallel_per_device=1,
        eval_steps=(4, 2),
        eval_batch=8,
    ),  # fmt: skip
}
# The GPU protocol with compiled blocks: the same runs, to time against the eager one.
PROFILES["gpu-compiled"] = replace(PROFILES["gpu"], compile=True)
# The test suite's: every phase once, as small as it gets.
PROFILES["test"] = replace(
    PROFILES["cpu"], num_images=48, num_eval_per_tag=1, autoencoder_steps=3, autoencoder_batch=8,
    pretrain_steps=2, posttrain_steps=2, trajectory_length=1, grpo_epochs=1, grpo_eval_every=1,
    eval_steps=(2,), model=replace(PROFILES["cpu"].model, num_layers=1),
)  # fmt: skip


@dataclass
class Study:
    """Paths and the settings shared by every run of one split seed."""

    out: Path
    profile: Profile
    split_seed: int
    session: Any = None
    """The run's EvalSession (soar_ray.eval.runner), open while its checkpoints are evaluated."""
    feature_vae: Any = None
    """The split's autoencoder, the feature network of the Frechet distance."""
    truth_features: dict = field(default_factory=dict)
    """Features of the rendered truth of a prompt set's evaluation rows, by (file, rows): the
    same at every evaluation of the set."""
    gpu_share: float = 1.0
    """GPU fraction of each of a run's learner and rollout workers (`share`)."""
    cpu_share: float = 1.0
    """CPU fraction of each of a run's actors (`share`)."""
    launched: float = field(default_factory=time.time)
    """When the protocol launched this driver process (its `LAUNCHED` variable)."""
    timings: list = field(default_factory=list)
    """[what, seconds from the launch to its start, seconds it took] of a run's phases: where
    a run's wall time goes (start-up, training, each evaluation and its Frechet distance)."""

    def timed(self, what: str, started: float) -> None:
        """Record a phase that began at `started` (time.time()) and ends now."""
        now = time.time()
        self.timings.append([what, round(started - self.launched, 2), round(now - started, 2)])

    @property
    def root(self) -> Path:
        return self.out / f"split-{self.split_seed}"

    @property
    def world_dir(self) -> Path:
        return self.root / "world"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"


# ---- the world and its model --------------------------------------------------------------------


def load_images(world) -> np.ndarray:
    from PIL import Image

    rows = [json.loads(line) for line in world.jsonl_path.read_text().splitlines()]
    return np.stack([np.asarray(Image.open(world.image_dir / f"{row['md5']}.jpg").convert("RGB"))
                     for row in rows])  # fmt: skip


def reference_images(rows: list[dict], size: int, seed: int) -> np.ndarray:
    """Rendered ground truth of evaluation rows: the real images of the Frechet distance."""
    rng = np.random.default_rng(seed)
    return np.stack([render(scene_for(row, rng), size) for row in rows])


def world_of(study: Study):
    """The split's world (written on first use; afterwards its paths, at once)."""
    profile = study.profile
    return make_shapes_set(study.world_dir, profile.num_images, make_split(study.split_seed),
                           image_size=profile.image_size, seed=study.split_seed,
                           num_eval_per_tag=profile.num_eval_per_tag)  # fmt: skip


def setup_split(study: Study) -> dict:
    """The world, its autoencoder, the study's SD3 folder and the latent cache of one split."""
    profile = study.profile
    world = world_of(study)
    if not (study.model_dir / "model_index.json").is_file():
        device = torch.device("cpu")
        if profile.gpu:  # splits set up side by side take different GPUs
            device = torch.device("cuda", study.split_seed % torch.cuda.device_count())
        images = load_images(world)
        start = time.perf_counter()
        vae, losses = train_autoencoder(
            images, profile.model, steps=profile.autoencoder_steps,
            batch_size=profile.autoencoder_batch, device=device, seed=study.split_seed,
        )  # fmt: skip
        stats = {"seconds": time.perf_counter() - start, "loss_first": losses[0],
                 "loss_last": losses[-1],
                 "reconstruction": reconstruction_score(vae, world, profile.image_size)}  # fmt: skip
        latent = profile.image_size // 2 ** (len(profile.model.vae_channels) - 1)
        save_study_model(vae.cpu(), profile.model, latent, study.split_seed, study.model_dir)
        (study.model_dir / "autoencoder.json").write_text(json.dumps(stats) + "\n")
    prepare_cache(study, job_tree(study, "prepare", 0, base_stage(profile), world, 1), world)
    return {"autoencoder": json.loads((study.model_dir / "autoencoder.json").read_text())}


def reconstruction_score(vae, world, image_size: int) -> float:
    """shapes_geneval of held-out ground truth after encode/decode: the ceiling of any model."""
    import rewards

    rows = [json.loads(line) for line in world.eval_held_out.read_text().splitlines()]
    truth = reference_images(rows, image_size, seed=1)
    out = rewards.load("shapes_geneval").score(list(reconstruct(vae, truth)),
                                               [r["prompt"] for r in rows], rows)  # fmt: skip
    return float(out.scores.mean())


# ---- jobs ------------------------------------------------------------------------------------------


def job_tree(study: Study, name: str, seed: int, stage: dict, world, every: int) -> dict:
    """A job file's content: the study model, the world's latent cache, one stage."""
    profile = study.profile
    gpu = profile.gpu
    return {
        "name": name, "seed": seed, "output_dir": str(study.root / name),
        "model": {"pretrained": str(study.model_dir), "resolution": profile.image_size,
                  "dtype": "fp32", "t5_max_length": 77},
        "data": {"source": "cache", "cache_dir": str(study.root / "cache"),
                 "batch_size": profile.batch_size,
                 "num_workers": 2 if gpu else 0,
                 "prompts": {"path": str(world.train_prompts), "kind": "geneval"},
                 "eval_prompts": {"path": str(world.eval_held_out), "kind": "geneval"}},
        "stages": [stage],
        # Fractions: the runs in parallel share the GPUs (or the CPUs). A SOAR stage rolls out
        # on its learner (colocated); GRPO samples on a rollout worker, as does the run's
        # evaluation beside the training.
        "cluster": {"num_learners": 1, "gpus_per_learner": study.gpu_share if gpu else 0,
                    "cpus_per_learner": study.cpu_share,
                    "num_rollout_workers": int(stage.get("algorithm") == "grpo"),
                    "gpus_per_rollout_worker": study.gpu_share if gpu else 0,
                    "cpus_per_rollout_worker": study.cpu_share,
                    "reward_actors": {"shapes_geneval": {"num_cpus": study.cpu_share}},
                    "start_timeout_s": 3600, "compile_rollout_blocks": profile.compile},
        "rewards": {"shapes_geneval": {}},  # also sizes the evaluation session's scoring actor
        # One learner in plain torch: at this model size a DeepSpeed step is mostly its
        # per-parameter bookkeeping (RESULTS.md, the second GPU calibration).
        "deepspeed": {"enabled": False, "precision": "bf16" if gpu else "fp32",
                      "activation_checkpointing": False, "compile_blocks": profile.compile},
        "checkpoint": {"every": every, "keep_last": 1000},
        "logging": {"tensorboard": False, "progress_bar": False, "ray_metrics": False,
                    "sample_every": 0},
    }  # fmt: skip


def soar_stage(profile: Profile, steps: int, lr: float, *, lambda_aux: float, cfg: float) -> dict:
    return {
        "algorithm": "soar", "name": "train", "num_steps": steps, "lambda_aux": lambda_aux,
        "trajectory_length": profile.trajectory_length if lambda_aux else 0,
        "cfg_scale_sampling": cfg, "cond_dropout_rate": 0.1,
        "optimizer": {"lr": lr},
        "ema": {"enabled": True, "decay": 0.99, "every": 1},
    }  # fmt: skip


def soar_compute_ratio(profile: Profile) -> float:
    """FLOPs of a SOAR sample over an SFT sample: (1 + P) forward/backward passes (3 forward
    units each) plus the 2 no-grad forwards of the CFG rollout step, against 3 units."""
    return ((1 + profile.trajectory_length) * 3 + 2) / 3


def prepare_cache(study: Study, tree: dict, world) -> None:
    """`soar-ray prepare`: the world's latents and caption embeddings, encoded once a split."""
    from soar_ray.cli import main

    if (study.root / "cache" / "manifest.json").is_file():
        return
    source = {
        **tree,
        "data": {
            **tree["data"],
            "source": "jsonl",
            "cache_dir": None,
            "jsonl": str(world.jsonl_path),
            "image_dir": str(world.image_dir),
        },
    }
    path = study.root / "prepare.yaml"
    path.write_text(yaml.safe_dump(source, sort_keys=False))
    if main(["prepare", str(path), "--out", str(study.root / "cache"), "--batch-size", "256"]):
        raise RuntimeError(f"soar-ray prepare {path} failed")


# ---- evaluation ------------------------------------------------------------------------------------


def evaluate(study: Study, transformer: Path, prompts: Path, steps: int, out: Path) -> dict:
    """`soar-ray eval`'s sampling and report for one transformer on a prompt set of the world,
    in the split's evaluation session: GenEval numbers and the Frechet distance to truth."""
    from soar_ray.eval.command import check_resumable, prepare_eval

    profile = study.profile
    prompt_rows, settings = prepare_eval(
        study.session.job, transformer, prompts, "geneval", "shapes_geneval", steps=steps,
        cfg=4.5, images_per_prompt=profile.images_per_prompt, seed=0, resolution=None,
    )  # fmt: skip
    check_resumable(out, settings)
    started = time.time()
    summary = study.session.evaluate(prompt_rows, settings, out, profile.eval_batch)
    study.timed(f"eval {out.name}", started)
    started = time.time()
    fd = frechet_to_truth(study, out)
    study.timed(f"fd {out.name}", started)
    return {"overall": summary["geneval"]["overall"], "per_tag": summary["geneval"]["per_tag"],
            "accuracy": summary["geneval"]["accuracy"], "fd": fd}  # fmt: skip


def features(vae, images: np.ndarray) -> np.ndarray:
    """The study autoencoder's latent mean, pooled to 2 x 2 per channel, plus each channel's
    spatial std: an 80-dimensional feature of a 32 px image."""
    from shapes_models import to_pixels

    with torch.no_grad():
        z = vae.encode(to_pixels(images, torch.device("cpu"))).latent_dist.mean
    pooled = torch.nn.functional.adaptive_avg_pool2d(z, 2).flatten(1)
    return torch.cat([pooled, z.flatten(2).std(2)], 1).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two Gaussians fitted to feature rows (the FID formula); the trace of
    sqrt(C_a C_b) is that of sqrt(S C_b S) with S = sqrt(C_a), both symmetric PSD (eigh only)."""

    def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = (np.atleast_2d(np.cov(x, rowvar=False)) for x in (a, b))
    root_a = psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def frechet_to_truth(study: Study, eval_dir: Path) -> float:
    """Frechet distance of an evaluation's images to rendered truth of the same prompts."""
    import pyarrow.parquet as pq
    from diffusers import AutoencoderKL
    from PIL import Image

    rows = pq.read_table(eval_dir / "scores.parquet").to_pylist()
    made = np.stack([np.asarray(Image.open(eval_dir / r["image"]).convert("RGB")) for r in rows])
    prompts_file = Path(json.loads((eval_dir / "eval.json").read_text())["prompts"])
    if study.feature_vae is None:  # loaded once a split, not at every evaluation
        study.feature_vae = AutoencoderKL.from_pretrained(study.model_dir / "vae")
    key = (prompts_file, tuple(r["prompt_index"] for r in rows), made.shape[1])
    if key not in study.truth_features:
        table = [json.loads(line) for line in prompts_file.read_text().splitlines()]
        truth = reference_images([table[i] for i in key[1]], made.shape[1], seed=7)
        study.truth_features[key] = features(study.feature_vae, truth)
    return frechet(features(study.feature_vae, made), study.truth_features[key])


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints (a folder is renamed into place only once whole), in order."""
    return sorted(folder for folder in (run_dir / "checkpoints").glob("step-*")
                  if (folder / "transformer" / "config.json").is_file())  # fmt: skip


def evaluate_run(study: Study, world, run_dir: Path, stage: str, steps_list: tuple[int, ...],
                 trained: threading.Event, cancelled: threading.Event) -> dict | None:  # fmt: skip
    """Every checkpoint of a run on the held-out prompts at the first step count (the curve),
    each as soon as it is written while the run trains; once `trained` is set, the last one on the
    seen prompts too and the output at every step count. None when `cancelled` (training failed)."""
    first = steps_list[0]
    curve: dict[str, dict] = {}
    while not cancelled.is_set():
        finished = trained.is_set()  # before listing: a checkpoint older than the flag is seen
        for folder in checkpoint_folders(run_dir):
            if folder.name not in curve and not cancelled.is_set():
                out = run_dir / "eval" / f"{folder.name}-held_out-{first}"
                curve[folder.name] = {
                    "step": int(folder.name.rsplit("-", 1)[1]),
                    "held_out": evaluate(study, folder / "transformer", world.eval_held_out,
                                         first, out),
                }  # fmt: skip
        if finished:
            break
        trained.wait(1.0)
    if cancelled.is_set():
        return None
    folders = checkpoint_folders(run_dir)
    points = [curve[folder.name] for folder in folders]
    final, output = {}, run_dir / stage / "transformer"
    last = folders[-1] / "transformer" if folders else None
    if last is not None:
        out = run_dir / "eval" / f"{last.parent.name}-seen-{first}"
        points[-1]["seen"] = evaluate(study, last, world.eval_seen, first, out)
    for steps in steps_list:
        for name, prompts in (("seen", world.eval_seen), ("held_out", world.eval_held_out)):
            if steps == first and last is not None and same_weights(last, output):
                final[f"{name}_{steps}"] = points[-1][name]  # the last checkpoint is the output
                continue
            out = run_dir / "eval" / f"final-{name}-{steps}"
            final[f"{name}_{steps}"] = evaluate(study, output, prompts, steps, out)
    return {"curve": points, "final": final}


def same_weights(a: Path, b: Path) -> bool:
    """Whether two transformer folders hold byte-identical weights."""
    import filecmp

    files = sorted(p.name for p in a.glob("*.safetensors"))
    return (
        bool(files)
        and files == sorted(p.name for p in b.glob("*.safetensors"))
        and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    )


# ---- the runs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One run of a split: its stage, seed, checkpoint interval and where it starts."""

    stage: dict
    seed: int
    every: int
    start: str | None = None
    """The run whose output this one post-trains (None: the study model from scratch)."""
    batch_size: int | None = None
    """The data batch, where not the profile's post-training batch."""


def base_stage(profile: Profile) -> dict:
    return soar_stage(profile, profile.pretrain_steps, profile.pretrain_lr, lambda_aux=0.0, cfg=4.5)


def grpo_stage(profile: Profile) -> dict:
    return {
        "algorithm": "grpo", "name": "train", "rewards": {"shapes_geneval": 1.0},
        "num_epochs": profile.grpo_epochs, "num_sampling_steps": 10,
        "eval_every": 0,  # the study evaluates every checkpoint itself (EMA weights)
        "group_size": 8, "num_groups_per_epoch": 16 if profile.gpu else 2,
        "sample_batch_size": 128 if profile.gpu else 8, "train_batch_size": 64 if profile.gpu else 8,
        "num_updates_per_epoch": 1, "timestep_fraction": 1.0, "clip_range": 0.2, "beta": 0.01,
        "noise_level": 0.7, "lora": {"enabled": False}, "optimizer": {"lr": 1e-4},
        "ema": {"enabled": True, "every": 1},
    }  # fmt: skip


def run_specs(profile: Profile) -> dict[str, RunSpec]:
    """Every run of a split, in the order they are started: the base; the two runs GRPO starts
    from; GRPO from each; the other post-training runs. SFT at SOAR's compute trains the same
    steps on a batch `soar_compute_ratio` times larger, checkpointed at the same steps."""
    steps, lr, every = profile.posttrain_steps, profile.posttrain_lr, max(1, profile.eval_every)
    first = profile.seeds[0]
    sft = soar_stage(profile, steps, lr, lambda_aux=0.0, cfg=4.5)
    post = {"sft": RunSpec(sft, 0, every, "base")}
    for cfg in profile.soar_cfgs:
        stage = soar_stage(profile, steps, lr, lambda_aux=1.0, cfg=cfg)
        post[f"soar-cfg{cfg:g}"] = RunSpec(stage, 0, every, "base")
    post["sft-compute"] = RunSpec(sft, 0, every, "base",
                                  round(profile.batch_size * soar_compute_ratio(profile)))  # fmt: skip
    specs = {"base": RunSpec(base_stage(profile), 0, profile.pretrain_steps,
                             batch_size=profile.pretrain_batch)}  # fmt: skip
    seeded = {f"{name}-seed{seed}": replace(spec, seed=seed)
              for seed in profile.seeds for name, spec in post.items()}  # fmt: skip
    origins = [f"{name}-seed{first}" for name in ("soar-cfg4.5", "sft")]
    specs.update({name: seeded.pop(name) for name in origins})
    for origin in origins:
        specs[f"grpo-from-{method_of(origin)}"] = RunSpec(
            grpo_stage(profile), first, profile.grpo_eval_every, origin
        )
    specs.update(seeded)
    return specs


def run_tree(study: Study, name: str, world) -> dict:
    """The job file of run `name` of the split."""
    spec = run_specs(study.profile)[name]
    tree = job_tree(study, name, spec.seed, spec.stage, world, spec.every)
    if spec.batch_size:
        tree["data"]["batch_size"] = spec.batch_size
    if spec.start:
        tree["model"]["transformer"] = str(study.root / spec.start / "train" / "transformer")
    return tree


def train_and_evaluate(study: Study, name: str) -> dict:
    """One run in this process (a driver of the study's Ray): `soar-ray run` of its job file
    (skipped when its output exists) while a thread evaluates each checkpoint as it is written,
    in an evaluation session of its own; then the output; returns the run's result."""
    from soar_ray.config import load_job
    from soar_ray.stages.pipeline import check_pipeline, run_pipeline

    world = world_of(study)
    tree = run_tree(study, name, world)
    run_dir = Path(tree["output_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    job = load_job(run_dir / "job.yaml")
    timing = trained_marker(run_dir)  # kept apart: a rerun that only evaluates keeps it
    trained, cancelled = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        evaluation = pool.submit(evaluate_in_session, study, job, world, run_dir, trained,
                                 cancelled)  # fmt: skip
        try:
            if not timing.is_file():
                check_pipeline(job)
                started = time.time()
                run_pipeline(job, run_dir)
                timing.write_text(json.dumps(time.time() - started) + "\n")
                study.timed("training", started)
        except BaseException:
            cancelled.set()
            raise
        finally:
            trained.set()
        result: dict[str, Any] = {"seconds": json.loads(timing.read_text())}
        result.update(evaluation.result())
    result["timings"] = study.timings
    if tree["stages"][0]["algorithm"] == "grpo":
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result["reward"] = [[r["step"], r["reward_mean"]] for r in rows if "reward_mean" in r]
    return result


def trained_marker(run_dir: Path) -> Path:
    """Written once a run's training is done (its training seconds): the runs that start from it
    may start, while it still evaluates."""
    return run_dir / "seconds.json"


def evaluate_in_session(study: Study, job, world, run_dir: Path, trained: threading.Event,
                        cancelled: threading.Event) -> dict | None:  # fmt: skip
    from soar_ray.eval.runner import EvalSession

    started = time.time()
    with EvalSession(job, ["shapes_geneval"], 1) as study.session:
        study.timed("evaluation session start", started)
        return evaluate_run(study, world, run_dir, "train", study.profile.eval_steps, trained,
                            cancelled)  # fmt: skip


# ---- the protocol: runs as driver processes, in parallel ---------------------------------------------


@dataclass(frozen=True)
class Task:
    """A driver process of the study: one split's setup, or one run."""

    split_seed: int
    name: str  # "setup" or a run's name
    after: str | None  # the task of the same split it waits for (see `ready`)

    def folder(self, out: Path) -> Path:
        return out / f"split-{self.split_seed}" / self.name

    def result_path(self, out: Path) -> Path:
        return self.folder(out) / "result.json"

    def ready(self, out: Path, done: set[tuple[int, str]]) -> bool:
        """Setup first; a run as soon as the run it starts from has trained (its evaluation may
        still be going)."""
        if self.after is None:
            return True
        if self.after == "setup":
            return (self.split_seed, "setup") in done
        return trained_marker(out / f"split-{self.split_seed}" / self.after).is_file()


def protocol_tasks(profile: Profile) -> list[Task]:
    """Every task, splits interleaved so that each split's chain starts early."""
    tasks = []
    for split_seed in profile.split_seeds:
        tasks.append(Task(split_seed, "setup", None))
        for name, spec in run_specs(profile).items():
            tasks.append(Task(split_seed, name, spec.start or "setup"))
    order = {name: i for i, name in enumerate(["setup", *run_specs(profile)])}
    return sorted(tasks, key=lambda t: (order[t.name], t.split_seed))


def run_protocol(out: Path, profile_name: str, profile: Profile, parallel: int) -> dict:
    """Every task of every split on one Ray (a local one unless RAY_ADDRESS names one), at most
    `parallel` driver processes at a time; results.json is rewritten as each task finishes.
    A failed task stops the protocol, naming its log (a rerun resumes)."""
    # Loopback only, and token mode with the environment's token or one of the study's own,
    # which its driver processes inherit. Ray reads these at import: set them first.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Every learner and rollout worker of every run compiles the same blocks (compiled
    # profiles), mostly hits in inductor's shared cache: one compile thread each, not a pool of
    # worker processes the size of the host in each of them. Ray's workers inherit it.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    from soar_ray.cluster.session import ray_session
    from soar_ray.config import ClusterConfig

    out.mkdir(parents=True, exist_ok=True)
    pending = protocol_tasks(profile)
    with ray_session(ClusterConfig()) as session:
        env = {**os.environ, "RAY_ADDRESS": session.address}
        running: dict[Task, tuple[subprocess.Popen, float]] = {}
        done = {(t.split_seed, t.name) for t in pending if t.result_path(out).is_file()}
        pending = [t for t in pending if (t.split_seed, t.name) not in done]
        try:
            while pending or running:
                ready = [t for t in pending if t.ready(out, done)]
                for task in ready[: parallel - len(running)]:
                    pending.remove(task)
                    running[task] = (
                        launch(out, profile_name, task, env, parallel),
                        time.perf_counter(),
                    )
                    print(f"shapes: started split {task.split_seed} {task.name}", flush=True)
                time.sleep(0.5)
                for task, (process, started) in list(running.items()):
                    if process.poll() is None:
                        continue
                    del running[task]
                    log = task.folder(out) / "driver.log"
                    if process.returncode:
                        tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
                        raise RuntimeError(f"split {task.split_seed} {task.name} failed "
                                           f"(exit {process.returncode}); see {log}:\n{tail}")  # fmt: skip
                    done.add((task.split_seed, task.name))
                    print(f"shapes: finished split {task.split_seed} {task.name} in "
                          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
                    gather_results(out, profile)
        finally:
            for process, _ in running.values():
                process.terminate()
            for process, _ in running.values():
                process.wait()
    return gather_results(out, profile)


GPU_ACTORS, CPU_ACTORS = 3, 5
"""The most actors a run holds at once: GRPO's learner, rollout worker and reward actor, and its
evaluation's rollout worker and reward actor; all but the reward actors on a GPU."""


def share(parallel: int, total: float, actors: int) -> float:
    """Each actor's fraction of `total` GPUs or CPUs when `parallel` runs of up to `actors` actors
    share them: all fit at once, so no run waits on Ray for its share while the others hold
    theirs; the runs share the devices' time instead (each actor still runs one thread)."""
    return int(total / (actors * parallel) * 10_000) / 10_000  # Ray counts in 1e-4 units


LAUNCHED = "SHAPES_LAUNCHED"  # the variable that tells a driver process when it was launched


def launch(out: Path, profile_name: str, task: Task, env: dict[str, str],
           parallel: int) -> subprocess.Popen:  # fmt: skip
    folder = task.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "driver.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, __file__, "--out", str(out), "--profile", profile_name,
             "--parallel", str(parallel), "--task", f"{task.split_seed}:{task.name}"],
            stdout=log, stderr=subprocess.STDOUT, env={**env, LAUNCHED: str(time.time())},
        )  # fmt: skip


def run_task(out: Path, profile: Profile, spec: str, parallel: int) -> None:
    """The body of a driver process: `SPLIT:setup` or `SPLIT:RUN` of a protocol running
    `parallel` at a time; writes its result.json last."""
    split_seed, name = spec.split(":", 1)
    launched = float(os.environ.get(LAUNCHED, time.time()))
    study = Study(out, profile, int(split_seed), launched=launched)
    task = Task(study.split_seed, name, None)
    if name == "setup":
        result = setup_split(study)
    else:
        import ray

        from soar_ray.cluster.session import ray_session
        from soar_ray.config import ClusterConfig

        # The driver's own work (reading images, the Frechet features) is small; `parallel`
        # drivers each on every core would only take the cores from the runs' actors.
        torch.set_num_threads(min(torch.get_num_threads(), 2))
        with ray_session(ClusterConfig()):
            resources = ray.cluster_resources()  # the study's Ray: what the runs share
            study.gpu_share = share(parallel, resources.get("GPU", 0.0), GPU_ACTORS)
            study.cpu_share = share(parallel, resources["CPU"], CPU_ACTORS)
            result = train_and_evaluate(study, name)
    task.result_path(out).write_text(json.dumps(result, indent=1) + "\n")


def gather_results(out: Path, profile: Profile) -> dict:
    """results.json from every finished task's result.json."""
    results: dict[str, Any] = {"profile": asdict(profile), "splits": {}}
    for split_seed in profile.split_seeds:
        split: dict[str, Any] = {}
        root = out / f"split-{split_seed}"
        for task in ["setup", *run_specs(profile)]:
            path = root / task / "result.json"
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            if "seconds" in result and task != "setup":
                split.setdefault("seconds", {})[task] = result.pop("seconds")
            if task == "setup":
                split.update(result)
            elif task == "base":
                split["base"] = result
            elif task.startswith("grpo-from-"):
                split.setdefault("grpo", {})[task.removeprefix("grpo-from-")] = result
            else:
                split.setdefault("methods", {})[task] = result
        results["splits"][str(split_seed)] = split
    text = json.dumps(results, indent=1) + "\n"
    (out / "results.json").write_text(text)
    return json.loads(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="study folder (resumable)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    parser.add_argument("--phases", default="train,report", help="train, report (comma-separated)")
    parser.add_argument("--split-seeds", help="override the profile's, e.g. 0")
    parser.add_argument("--parallel", type=int, help="runs at a time (default: the profile's "
                        "parallel_per_device per GPU, or per 4 CPUs)")  # fmt: skip
    parser.add_argument("--merge", help="report phase: first merge the splits of these "
                        "results.json files (comma-separated; e.g. one GPU call per split) into "
                        "OUT/results.json")  # fmt: skip
    parser.add_argument("--task", help=argparse.SUPPRESS)  # a driver process of the protocol
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    if args.split_seeds:
        profile = replace(profile, split_seeds=tuple(int(s) for s in args.split_seeds.split(",")))
    out = Path(args.out)
    devices = torch.cuda.device_count() if profile.gpu else max(1, (os.cpu_count() or 1) // 4)
    parallel = args.parallel or profile.parallel_per_device * devices
    if args.task:
        run_task(out, profile, args.task, parallel)
        return
    phases = args.phases.split(",")
    if "train" in phases:
        run_protocol(out, args.profile, profile, parallel)
    if "report" in phases:
        from shapes_report import merge_results, write_report

        if args.merge:
            out.mkdir(parents=True, exist_ok=True)
            merged = merge_results([json.loads(Path(f).read_text()) for f in args.merge.split(",")])
            (out / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
        write_report(json.loads((out / "results.json").read_text()), out)


if __name__ == "__main__":
    main()

"""SFT vs SOAR vs SOAR -> Flow-GRPO in the shapes world, scored exactly (`shapes_geneval`).

    python benchmarks/shapes_geneval.py --out runs/shapes                 # the GPU protocol
    python benchmarks/shapes_geneval.py --out runs/shapes-cpu --profile cpu   # pipeline check

For every split seed: write the world (training images of the seen compositions, GenEval-format
prompt sets of seen and held-out compositions), train its autoencoder, save the study's SD3
folder, pre-train a small MMDiT from scratch with flow matching (`soar-ray run`, a SOAR stage with
lambda_aux 0), then post-train that base with SFT and with SOAR at rollout CFG 1, 2 and 4.5 over
several seeds at equal steps and batch, plus SFT at SOAR's compute (more steps), then Flow-GRPO
with `shapes_geneval` from the SOAR (CFG 4.5) and the SFT result. Every checkpoint (EMA weights) is
evaluated with `soar-ray eval` on the seen and held-out prompts (40 ODE steps; the final ones at
10 steps too), and a Frechet distance to rendered held-out images is taken on the study
autoencoder's latent features. Every run is a job file in its folder (`soar-ray run` reruns it);
finished runs and evaluations are skipped, so the command resumes. `results.json` holds every
number; `--phases report` draws the plots (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_models import ModelShape, reconstruct, save_study_model, train_autoencoder  # noqa: E402

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
    posttrain_steps: int = 600
    posttrain_lr: float = 2e-4
    eval_every: int = 150
    soar_cfgs: tuple[float, ...] = (1.0, 2.0, 4.5)
    trajectory_length: int = 6
    grpo_epochs: int = 40
    grpo_eval_every: int = 10
    gpu: bool = True
    eval_steps: tuple[int, ...] = (40, 10)


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
        eval_steps=(4, 2),
    ),  # fmt: skip
}
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
    results: dict[str, Any] = field(default_factory=dict)
    session: Any = None
    """The split's EvalSession (soar_ray.eval.runner), open while its runs are evaluated."""
    feature_vae: Any = None
    """The split's autoencoder, the feature network of the Frechet distance."""

    @property
    def root(self) -> Path:
        return self.out / f"split-{self.split_seed}"

    def save(self) -> None:
        """Merge this split's results into results.json (after every run: a killed study keeps
        what it measured)."""
        path = self.out / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        results["profile"] = asdict(self.profile)
        results.setdefault("splits", {})[str(self.split_seed)] = self.results
        path.write_text(json.dumps(results, indent=1) + "\n")

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


def build_world_and_model(study: Study, device: torch.device):
    profile = study.profile
    split = make_split(study.split_seed)
    world = make_shapes_set(study.world_dir, profile.num_images, split,
                            image_size=profile.image_size, seed=study.split_seed,
                            num_eval_per_tag=profile.num_eval_per_tag)  # fmt: skip
    stats = study.model_dir / "autoencoder.json"
    if not (study.model_dir / "model_index.json").is_file():
        images = load_images(world)
        start = time.perf_counter()
        vae, losses = train_autoencoder(
            images, profile.model, steps=profile.autoencoder_steps,
            batch_size=profile.autoencoder_batch, device=device, seed=study.split_seed,
        )  # fmt: skip
        study.results["autoencoder"] = {"seconds": time.perf_counter() - start,
                                        "loss_first": losses[0], "loss_last": losses[-1]}  # fmt: skip
        latent = profile.image_size // 2 ** (len(profile.model.vae_channels) - 1)
        save_study_model(vae.cpu(), profile.model, latent, study.split_seed, study.model_dir)
        study.results["autoencoder"]["reconstruction"] = reconstruction_score(
            vae, world, profile.image_size
        )
        stats.write_text(json.dumps(study.results["autoencoder"]) + "\n")
    study.results["autoencoder"] = json.loads(stats.read_text())
    return world


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
    """A job file's content: the study model, the world's images, one stage."""
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
        # Fractions: a run's learner and rollout worker and the split's evaluation worker share
        # the one GPU (or the CPUs).
        "cluster": {"num_learners": 1, "gpus_per_learner": 0.3 if gpu else 0,
                    "cpus_per_learner": 1 if gpu else 0.25, "num_rollout_workers": 1,
                    "gpus_per_rollout_worker": 0.3 if gpu else 0,
                    "cpus_per_rollout_worker": 1 if gpu else 0.25,
                    "reward_actors": {"shapes_geneval": {"num_cpus": 1 if gpu else 0.25}}},
        "rewards": {"shapes_geneval": {}},  # also sizes the evaluation session's scoring actor
        "deepspeed": {"precision": "bf16" if gpu else "fp32", "zero_stage": 1,
                      "activation_checkpointing": False},
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


def run_job(study: Study, tree: dict) -> Path:
    """`soar-ray run` of one job file (skipped when its output exists); returns the output."""
    from soar_ray.config import load_job
    from soar_ray.stages.pipeline import check_pipeline, run_pipeline

    run_dir = Path(tree["output_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    output = run_dir / tree["stages"][0]["name"] / "transformer"
    if (output / "config.json").is_file():
        return output
    job = load_job(run_dir / "job.yaml")
    check_pipeline(job)
    start = time.perf_counter()
    run_pipeline(job, run_dir)
    study.results.setdefault("seconds", {})[tree["name"]] = time.perf_counter() - start
    return output


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
    summary = study.session.evaluate(prompt_rows, settings, out, 64 if profile.gpu else 8)
    return {"overall": summary["geneval"]["overall"], "per_tag": summary["geneval"]["per_tag"],
            "accuracy": summary["geneval"]["accuracy"], "fd": frechet_to_truth(study, out)}  # fmt: skip


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
    table = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    truth = reference_images([table[r["prompt_index"]] for r in rows], made.shape[1], seed=7)
    if study.feature_vae is None:  # loaded once a split, not at every evaluation
        study.feature_vae = AutoencoderKL.from_pretrained(study.model_dir / "vae")
    return frechet(features(study.feature_vae, made), features(study.feature_vae, truth))


def evaluate_run(study: Study, world, run_dir: Path, stage: str, steps_list: tuple[int, ...]):
    """Every checkpoint of a run at the first step count (the curve), the output at all."""
    curve = []
    for folder in sorted((run_dir / "checkpoints").glob("step-*")):
        if not (folder / "transformer" / "config.json").is_file():
            continue
        step = int(folder.name.rsplit("-", 1)[1])
        point = {"step": step}
        for name, prompts in (("seen", world.eval_seen), ("held_out", world.eval_held_out)):
            out = run_dir / "eval" / f"{folder.name}-{name}-{steps_list[0]}"
            point[name] = evaluate(study, folder / "transformer", prompts, steps_list[0], out)
        curve.append(point)
        last = folder / "transformer"
    final, output = {}, run_dir / stage / "transformer"
    for steps in steps_list:
        for name, prompts in (("seen", world.eval_seen), ("held_out", world.eval_held_out)):
            if steps == steps_list[0] and curve and same_weights(last, output):
                final[f"{name}_{steps}"] = curve[-1][name]  # the last checkpoint is the output
                continue
            out = run_dir / "eval" / f"final-{name}-{steps}"
            final[f"{name}_{steps}"] = evaluate(study, output, prompts, steps, out)
    return {"curve": curve, "final": final}


def same_weights(a: Path, b: Path) -> bool:
    """Whether two transformer folders hold byte-identical weights."""
    import filecmp

    files = sorted(p.name for p in a.glob("*.safetensors"))
    return (
        bool(files)
        and files == sorted(p.name for p in b.glob("*.safetensors"))
        and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    )


def methods(profile: Profile) -> dict[str, dict]:
    """Post-training runs from the base: name -> (stage settings, steps)."""
    steps, lr = profile.posttrain_steps, profile.posttrain_lr
    runs = {"sft": soar_stage(profile, steps, lr, lambda_aux=0.0, cfg=4.5)}
    for cfg in profile.soar_cfgs:
        runs[f"soar-cfg{cfg:g}"] = soar_stage(profile, steps, lr, lambda_aux=1.0, cfg=cfg)
    compute_steps = round(steps * soar_compute_ratio(profile))
    runs["sft-compute"] = soar_stage(profile, compute_steps, lr, lambda_aux=0.0, cfg=4.5)
    return runs


def grpo_stage(profile: Profile) -> dict:
    return {
        "algorithm": "grpo", "name": "train", "rewards": {"shapes_geneval": 1.0},
        "num_epochs": profile.grpo_epochs, "num_sampling_steps": 10,
        "eval_num_sampling_steps": 40 if profile.gpu else 4, "eval_every": profile.grpo_eval_every,
        "group_size": 8, "num_groups_per_epoch": 16 if profile.gpu else 2,
        "sample_batch_size": 64 if profile.gpu else 8, "train_batch_size": 64 if profile.gpu else 8,
        "num_updates_per_epoch": 1, "timestep_fraction": 1.0, "clip_range": 0.2, "beta": 0.01,
        "noise_level": 0.7, "lora": {"enabled": False}, "optimizer": {"lr": 1e-4},
        "ema": {"enabled": True, "every": 1},
    }  # fmt: skip


def run_split(study: Study, device: torch.device) -> None:
    profile = study.profile
    world = build_world_and_model(study, device)
    base_stage = soar_stage(profile, profile.pretrain_steps, profile.pretrain_lr, lambda_aux=0.0,
                            cfg=4.5)  # fmt: skip
    base_tree = job_tree(study, "base", 0, base_stage, world, profile.pretrain_steps)
    base_tree["data"]["batch_size"] = profile.pretrain_batch
    prepare_cache(study, base_tree, world)
    base = run_job(study, base_tree)
    from soar_ray.config import load_job
    from soar_ray.eval.runner import EvalSession

    study.session = EvalSession(load_job(study.root / "base" / "job.yaml"), ["shapes_geneval"], 1)
    try:
        study.results["base"] = {"final": {
            f"{name}_{steps}": evaluate(study, base, prompts, steps,
                                        study.root / "base" / "eval" / f"final-{name}-{steps}")
            for steps in profile.eval_steps
            for name, prompts in (("seen", world.eval_seen), ("held_out", world.eval_held_out))
        }}  # fmt: skip
        study.save()
        post_train(study, world, base)
    finally:
        study.session.close()


def post_train(study: Study, world, base: Path) -> None:
    """SFT and SOAR runs from the base over the seeds, then GRPO from two of them."""
    profile = study.profile
    every = max(1, profile.eval_every)
    study.results["methods"] = {}
    for name, stage in methods(profile).items():
        # SFT at SOAR's compute checkpoints as often in compute, so its curve has as many points.
        scale = soar_compute_ratio(profile) if name == "sft-compute" else 1.0
        for seed in profile.seeds:
            tree = job_tree(study, f"{name}-seed{seed}", seed, stage, world, round(every * scale))
            tree["model"]["transformer"] = str(base)
            run_job(study, tree)
            study.results["methods"][f"{name}-seed{seed}"] = {
                "compute_per_step": 1 / scale,
                **evaluate_run(study, world, Path(tree["output_dir"]), "train", profile.eval_steps),
            }  # fmt: skip
            study.save()
    study.results["grpo"] = {}
    for start in ("soar-cfg4.5", "sft"):
        seed = profile.seeds[0]
        origin = study.root / f"{start}-seed{seed}" / "train" / "transformer"
        tree = job_tree(study, f"grpo-from-{start}", seed, grpo_stage(profile), world,
                        profile.grpo_eval_every)  # fmt: skip
        tree["model"]["transformer"] = str(origin)
        run_job(study, tree)
        run_dir = Path(tree["output_dir"])
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        study.results["grpo"][start] = {
            "reward": [[r["step"], r["reward_mean"]] for r in rows if "reward_mean" in r],
            **evaluate_run(study, world, run_dir, "train", profile.eval_steps),
        }  # fmt: skip
        study.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="study folder (resumable)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    parser.add_argument("--phases", default="train,report", help="train, report (comma-separated)")
    parser.add_argument("--split-seeds", help="override the profile's, e.g. 0")
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    if args.split_seeds:
        profile = replace(profile, split_seeds=tuple(int(s) for s in args.split_seeds.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    if "train" in phases:
        run_protocol(out, profile)
    if "report" in phases:
        from shapes_report import write_report

        write_report(json.loads((out / "results.json").read_text()), out)


def run_protocol(out: Path, profile: Profile) -> None:
    """Every split seed in one local Ray session; results.json is updated after every run."""
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from soar_ray.cluster.session import ray_session
    from soar_ray.config import ClusterConfig

    device = torch.device("cuda" if profile.gpu else "cpu")
    with ray_session(ClusterConfig()):
        for split_seed in profile.split_seeds:
            study = Study(out, profile, split_seed)
            run_split(study, device)
            study.save()


if __name__ == "__main__":
    main()

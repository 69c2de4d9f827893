"""`soar-ray run | submit | prepare | config | eval | rewards`: the command line of soar_ray."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from soar_ray.config import ConfigError, JobConfig, dump_config, load_job
from soar_ray.errors import RunStopped
from soar_ray.run_lock import RunFolderLock

if TYPE_CHECKING:
    from soar_ray.data import ImageCaptionDataset


def _job(args: argparse.Namespace) -> JobConfig:
    return load_job(args.job, args.overrides)


def _embedded_ray_on_loopback(job: JobConfig) -> None:
    """Before Ray is imported: an embedded single-node Ray needs no network, so keep it on
    127.0.0.1. Ray reads this flag (named for the platforms where loopback is the default) once,
    at import."""
    if job.cluster.address is None and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def cmd_run(args: argparse.Namespace) -> int:
    """Train every stage of the job; results land in the run folder."""
    job = _job(args)
    _embedded_ray_on_loopback(job)
    from soar_ray.cluster.session import RayConnectionError, ray_session
    from soar_ray.stages.pipeline import check_job, run_pipeline

    check_job(job)  # bad input is one line before Ray starts
    run_dir = job.output_path
    with ExitStack() as stack:
        stack.enter_context(RunFolderLock(run_dir, force=args.force))  # before anything is written
        (run_dir / "config.yaml").write_text(dump_config(job))
        print(f"soar-ray: job {job.name!r}, {len(job.stages)} stage(s), run folder {run_dir}")
        try:
            session = stack.enter_context(ray_session(job.cluster))
        except RayConnectionError as exc:
            print(f"soar-ray: error: {exc}", file=sys.stderr)
            return 2
        print(f"soar-ray: Ray at {session.address}, dashboard {session.dashboard_url or 'off'}, "
              f"metrics {session.metrics_url}")  # fmt: skip
        outputs = run_pipeline(job, run_dir)
    for name, path in zip(job.stage_names, outputs):
        print(f"soar-ray: stage {name} -> {path}")
    print(f"soar-ray: metrics {run_dir / 'metrics.jsonl'}, samples {run_dir / 'samples'}")
    return 0


def job_encoders(job: JobConfig) -> tuple[Callable, Callable]:
    """(encode_images, encode_prompts) of the job's VAE and text encoders, on this process's GPU
    when it sees one: what `prepare` runs, in this process or in each encoder actor."""
    import torch

    from soar_ray.build import build_sd3

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_sd3(job, device, components=("vae", "text_encoder", "text_encoder_2",
                                               "text_encoder_3"))  # fmt: skip
    return model.encode_images, model.encode_prompts


def cmd_prepare(args: argparse.Namespace) -> int:
    """Encode the job's images and captions into a Parquet latent cache, in this process or with
    Ray Data on the job's Ray cluster (`--workers`); an unfinished cache is resumed."""
    job = _job(args)
    bounds = [("--batch-size", args.batch_size, 1), ("--rows-per-shard", args.rows_per_shard, 1),
              ("--workers", args.workers, 0)]  # fmt: skip
    for flag, value, least in bounds:
        if value < least:
            raise ConfigError(f"{flag}: must be >= {least}, got {value}")
    if args.workers > 0:
        _embedded_ray_on_loopback(job)
    from soar_ray.build import build_dataset, model_identity
    from soar_ray.data import ImageCaptionDataset
    from soar_ray.data.cache import MANIFEST

    out_dir = Path(args.out or job.data.cache_dir or job.output_path / "cache")
    if (out_dir / MANIFEST).exists() and not args.overwrite:
        raise ConfigError(f"{out_dir} holds a complete cache; pass --overwrite to rebuild it")
    job.validate_paths()
    dataset = build_dataset(job)
    if not isinstance(dataset, ImageCaptionDataset):
        raise ConfigError(
            "data.source: 'cache' is already a cache; prepare reads jsonl or synthetic"
        )
    settings = {
        "model_id": model_identity(job), "batch_size": args.batch_size,
        "rows_per_shard": args.rows_per_shard, "overwrite": args.overwrite,
        "dtype": {"fp16": "float16", "fp32": "float32"}[job.data.cache_dtype],
    }  # fmt: skip
    try:
        manifest = _write_cache(job, dataset, out_dir, args.workers, settings)
    except ValueError as exc:  # a bad image (file and line) or encodings refused
        raise ConfigError(str(exc)) from None
    print(f"soar-ray: cached {len(dataset)} samples -> {manifest.parent}")
    print(f"soar-ray: train from it with --set data.source=cache --set data.cache_dir={out_dir}")
    return 0


def _write_cache(
    job: JobConfig, dataset: ImageCaptionDataset, out_dir: Path, workers: int, settings: dict
) -> Path:
    """The cache written in this process (`workers` 0) or by Ray Data with `workers` encoders."""
    from soar_ray.data import write_latent_cache

    if workers == 0:
        encode_images, encode_prompts = job_encoders(job)
        return write_latent_cache(dataset, out_dir, encode_images=encode_images,
                                  encode_prompts=encode_prompts, **settings)  # fmt: skip
    from soar_ray.cluster.session import RayConnectionError, ray_session
    from soar_ray.data.cache_ray import write_latent_cache_ray

    with ExitStack() as stack:
        try:
            session = stack.enter_context(ray_session(job.cluster))
        except RayConnectionError as exc:
            raise ConfigError(str(exc)) from None
        print(f"soar-ray: Ray at {session.address}, {workers} encoder actor(s)")
        return write_latent_cache_ray(dataset, out_dir, make_encoders=partial(job_encoders, job),
                                      num_workers=workers, **settings)  # fmt: skip


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config (defaults, job file and overrides merged)."""
    print(dump_config(_job(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soar-ray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("job", help="job file, e.g. jobs/tiny.yaml")
        sub.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY=VALUE", help="override a field, e.g. stages.0.lambda_aux=0")  # fmt: skip
        sub.set_defaults(func=func)
        return sub

    run = add("run", cmd_run, "train the job's stages")
    run.add_argument("--force", action="store_true",
                     help="take the run folder's lock from a run that is gone (another machine)")  # fmt: skip
    prepare = add("prepare", cmd_prepare, "write the Parquet latent/embedding cache")
    prepare.add_argument("--out", help="cache folder (default: data.cache_dir or RUN/cache)")
    prepare.add_argument("--batch-size", type=int, default=16, help="images per encode batch")
    prepare.add_argument("--rows-per-shard", type=int, default=1024,
                         help="rows per Parquet shard (a rerun keeps the finished shards)")  # fmt: skip
    prepare.add_argument("--workers", type=int, default=0, metavar="N",
                         help="encode on N Ray actors (one GPU each on a GPU cluster) fed by Ray "
                              "Data decode tasks; 0 encodes in this process")  # fmt: skip
    prepare.add_argument("--overwrite", action="store_true",
                         help="rebuild from nothing (default: resume an unfinished cache, refuse "
                              "a complete one)")  # fmt: skip
    add("config", cmd_config, "print the resolved config")
    from soar_ray.eval.command import add_eval_command
    from soar_ray.reward_commands import add_reward_commands
    from soar_ray.submit import add_submit_command

    add_submit_command(commands)
    add_eval_command(commands)
    add_reward_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, RunStopped) as exc:
        # User errors: one clear line, no traceback.
        print(f"soar-ray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

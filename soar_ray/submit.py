"""`soar-ray submit`: a job file as a Ray job on a running cluster, checked here first.

    soar-ray submit jobs/soar.yaml --set output_dir=/shared/runs/soar [--address URL] [--follow]

What `ray job submit --working-dir . -- soar-ray run JOB` does, without its traps: the job is
loaded and checked on this machine with the same checks as `soar-ray run` (one line for bad
input, before anything is uploaded); a relative `output_dir` is refused, since the entrypoint runs
in Ray's temporary copy of the working directory, which Ray may delete; the working directory is
this one, uploaded under Ray's ignore rules (`.gitignore`, `.rayignore`; Ray refuses more than
512 MiB). The job id and its dashboard page are printed; `--follow` streams the logs and exits
with the job's outcome (0 when it succeeded).

The cluster address: `--address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (the dashboard's
http://host:8265). A cluster with token authentication needs RAY_AUTH_MODE=token and its token
here (see the session module); the entrypoint itself runs with the head's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
from pathlib import Path

from soar_ray.config import ConfigError, load_job
from soar_ray.errors import RunStopped

ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class SubmitError(RunStopped):
    """The cluster could not take the job; the message says why and what to set."""


def load_checked_job(job_file: str, overrides: list[str]):
    """The job, checked as `soar-ray run` checks it before Ray starts, plus an absolute
    `output_dir`; the paths it names are read relative to this (the uploaded) directory."""
    job = load_job(job_file, overrides)
    if not Path(job.output_dir).is_absolute():
        raise ConfigError(
            f"output_dir: {job.output_dir!r} is relative, so the run folder would land in Ray's "
            "temporary copy of the working directory, which Ray may delete: give an absolute "
            "path on the head or on a shared file system, e.g. --set "
            f"output_dir=/shared/runs/{job.name}"
        )
    from soar_ray.stages.pipeline import check_job

    check_job(job)
    return job


def cluster_address(address: str | None) -> str:
    for value in (address, *(os.environ.get(name) for name in ADDRESS_VARIABLES)):
        if value:
            return value if "://" in value else f"http://{value}"
    raise SubmitError(
        "no cluster to submit to: pass --address http://HEAD:8265 (the dashboard) or export "
        "RAY_API_SERVER_ADDRESS"
    )


def entrypoint(job_file: str, overrides: list[str]) -> str:
    return shlex.join(["soar-ray", "run", job_file, *(f"--set={o}" for o in overrides)])


def submit(args: argparse.Namespace) -> int:
    job = load_checked_job(args.job, args.overrides)
    address = cluster_address(args.address)
    from ray.job_submission import JobSubmissionClient

    from soar_ray.cluster.session import TOKEN_HINT

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=entrypoint(args.job, args.overrides),
            submission_id=args.submission_id,
            runtime_env={"working_dir": ".", "env_vars": {"PYTHONUNBUFFERED": "1"}},
            metadata={"soar_ray_job": job.name, "output_dir": str(job.output_path)},
        )
    except (ConnectionError, RuntimeError) as exc:
        raise SubmitError(f"{address}: the job was not submitted: {exc}; {TOKEN_HINT}") from None
    print(f"soar-ray: submitted {job_id} ({job.name!r}, run folder {job.output_path})")
    print(f"soar-ray: dashboard {address}/#/jobs/{job_id}")
    if not args.follow:
        print(f"soar-ray: follow it with `ray job logs --address {address} -f {job_id}`")
        return 0
    asyncio.run(_stream(client, job_id))
    status = str(client.get_job_status(job_id).value)
    print(f"soar-ray: job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


async def _stream(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def add_submit_command(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("submit", help="run a job file as a Ray job on a cluster",
                              description=__doc__.split("\n\n")[0])  # fmt: skip
    sub.add_argument("job", help="job file, e.g. jobs/soar.yaml (relative to this directory)")
    sub.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a field, e.g. output_dir=/shared/runs/x")  # fmt: skip
    sub.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 "
                     "(default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)")  # fmt: skip
    sub.add_argument("--submission-id", help="the job id (default: Ray makes one)")
    sub.add_argument("--follow", action="store_true",
                     help="stream the logs and exit with the job's outcome")  # fmt: skip
    sub.set_defaults(func=submit)

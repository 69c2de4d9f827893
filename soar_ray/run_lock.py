"""One run per run folder: `soar-ray run` holds `output_dir/run.lock` for the run's life.

The lock file is created atomically (O_EXCL) and records who holds it: pid, host, Ray job id
(when the driver runs as a Ray job) and start time. A second run on the folder stops before it
writes anything, naming the holder. A lock whose holder is gone is stale and taken over with a
message: on the same host, a pid that no longer runs; from another host nothing can be checked,
so `--force` takes it (only when that run is known to be gone: two live runs on one folder
interleave their metrics and overwrite each other's checkpoints).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from soar_ray.errors import RunFolderBusy

LOCK_FILE = "run.lock"


def _owner() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "ray_job_id": os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _describe(owner: dict[str, Any]) -> str:
    job = f", Ray job {owner['ray_job_id']}" if owner.get("ray_job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, since {owner.get('started')}"


class RunFolderLock:
    """`with RunFolderLock(run_dir):` holds the folder; raises RunFolderBusy if a live run does."""

    def __init__(self, run_dir: Path, force: bool = False) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.force = force
        self.owner = _owner()

    def __enter__(self) -> RunFolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder = self._read()
            if holder is None:
                continue  # released, or being written, between our attempt and the read
            if self._stale(holder):
                print(f"soar-ray: taking over the lock of a run that is gone ({_describe(holder)})")
            elif self.force:
                print(f"soar-ray: --force: taking over the lock of {_describe(holder)}")
            else:
                raise RunFolderBusy(
                    f"{self.path.parent} is in use by another soar-ray run ({_describe(holder)}); "
                    "wait for it to end or use another output_dir. If that run is gone (its "
                    "machine was lost), run again with --force"
                )
            self.path.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        holder = self._read()
        if (
            holder is not None
            and holder.get("pid") == self.owner["pid"]
            and (holder.get("host") == self.owner["host"])
        ):
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as file:
            json.dump(self.owner, file)
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            if age < 10:
                time.sleep(0.1)  # its holder is writing it right now: read again
                return None
            # A holder killed between creating and writing the file: nothing runs behind it.
            return {"pid": None, "host": self.owner["host"], "started": "unknown (empty lock)"}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != self.owner["host"]:
            return False  # another machine's pid cannot be checked from here
        pid = holder.get("pid")
        return not isinstance(pid, int) or not _alive(pid)

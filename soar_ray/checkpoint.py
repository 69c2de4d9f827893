"""Atomic checkpoint folders: write to a staging folder, rename, then move the `latest` marker.

Layout under `checkpoint.dir`:
    step-000030/            a complete checkpoint (renamed into place only once whole)
      learners/             engine state of every rank (DeepSpeed or LocalEngine), per-rank RNG
      transformer/          the live weights as a diffusers folder (SD3Transformer2DModel)
      config.yaml           the resolved job config
      state.json            stage index and name, step, policy version, time; written last
    .staging-step-000060-*  a checkpoint being written (never read; removed when stale)
    latest                  the name of the newest complete checkpoint, replaced atomically
A folder counts as complete only if its `state.json` parses and names its own step; `auto` resume
takes `latest` when it points at a complete folder, else the newest complete one, so a crash at
any point (mid-write, before the rename, before the marker) never resumes from a broken folder.
The folder must be on storage every learner node can write (a shared file system on clusters).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "state.json"
LATEST = "latest"
PREFIX = "step-"
STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class CheckpointState:
    """Driver-side state of a checkpoint; the data position is the step (batches are step-indexed)."""

    stage_index: int
    stage_name: str
    step: int
    policy_version: int
    time: float = 0.0


def checkpoint_name(stage_index: int, step: int) -> str:
    return f"{PREFIX}{stage_index:02d}-{step:07d}"


def read_state(folder: Path) -> CheckpointState | None:
    """The state of a complete checkpoint folder, or None if it is incomplete or damaged."""
    try:
        raw = json.loads((folder / STATE_FILE).read_text())
        state = CheckpointState(**raw)
    except (OSError, ValueError, TypeError):
        return None
    if folder.name != checkpoint_name(state.stage_index, state.step):
        return None
    return state


class CheckpointManager:
    """Creates, commits, finds and prunes checkpoints in one folder."""

    def __init__(self, root: str | Path, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.root, self.keep_last = Path(root), keep_last

    def begin(self, stage_index: int, step: int) -> Path:
        """A fresh staging folder for the checkpoint of (stage, step)."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = checkpoint_name(stage_index, step)
        staging = self.root / f"{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        return staging

    def commit(self, staging: Path, state: CheckpointState) -> Path:
        """Seal `staging` with its state, rename it into place, move `latest`, prune old ones."""
        final = self.root / checkpoint_name(state.stage_index, state.step)
        state = CheckpointState(**{**asdict(state), "time": time.time()})
        _write_atomic(staging / STATE_FILE, json.dumps(asdict(state), indent=2))
        if final.exists():  # a re-run of the same step (after a resume) replaces it
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_atomic(self.root / LATEST, final.name + "\n")
        self.prune()
        return final

    def complete(self) -> list[tuple[CheckpointState, Path]]:
        """Every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            if folder.is_dir() and folder.name.startswith(PREFIX):
                state = read_state(folder)
                if state is not None:
                    found.append((state, folder))
        return sorted(found, key=lambda item: (item[0].stage_index, item[0].step))

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the `latest` marker if it is sound, else a scan."""
        marker = self.root / LATEST
        if marker.is_file():
            folder = self.root / marker.read_text().strip()
            if folder.name.startswith(PREFIX) and read_state(folder) is not None:
                return folder
        found = self.complete()
        return found[-1][1] if found else None

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop staging folders left by crashes."""
        for _, folder in self.complete()[: -self.keep_last]:
            shutil.rmtree(folder)
        self.remove_staging()

    def remove_staging(self) -> list[Path]:
        """Delete staging folders (checkpoints never committed: a crash or a full disk mid-write);
        only the run holding the folder writes here, so any not being committed is debris."""
        removed = sorted(self.root.glob(f"{STAGING_PREFIX}*")) if self.root.is_dir() else []
        for folder in removed:
            shutil.rmtree(folder)
        return removed


def resolve_resume(resume: str, manager: CheckpointManager) -> Path | None:
    """`checkpoint.resume`: 'never' -> None, 'auto' -> newest complete or None, else that path."""
    if resume == "never":
        return None
    if resume == "auto":
        return manager.latest()
    path = Path(resume)
    if read_state(path) is None:
        raise FileNotFoundError(
            f"checkpoint.resume: {path} is not a complete checkpoint (no valid {STATE_FILE})"
        )
    return path


def _write_atomic(path: Path, text: str) -> None:
    """Write a small file so readers see the old content or the new, never a mix."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)

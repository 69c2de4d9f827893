"""Atomic, verified checkpoint folders: write to a staging folder, seal it with a manifest and its
state, rename it into place, then move the `latest` marker.

Layout under `checkpoint.dir`:
    step-00-0000030/        a complete checkpoint (renamed into place only once whole)
      learners/             engine state of every rank (DeepSpeed or LocalEngine), per-rank RNG
      transformer/          the live weights as a diffusers folder (SD3Transformer2DModel)
      config.yaml           the resolved job config
      manifest.json         every file above: relative path, size in bytes, sha256
      state.json            stage index and name, step, policy version, time and the sha256 of
                            manifest.json; written last
    .staging-step-00-0000060-*  a checkpoint being written (never read; removed when stale)
    latest                  the name of the newest complete checkpoint, replaced atomically

Complete: `state.json` parses and names its own folder. A crash at any point (mid-write, before
the rename, before the marker) leaves no complete folder that is not whole.
Verified: manifest.json has the sha256 that state.json holds (so a damaged or deleted manifest is
found too) and every file it lists has its size and sha256; files it does not list are ignored.
This finds what happens to a complete folder afterwards: files that never reached the disk before
the machine died, a truncating copy, flipped bytes, a file deleted by hand. Checksums read every
byte once more, at commit (on the driver) and at resume.

`resume: auto` tries the `latest` marker's folder, then the folders older than it, newest first
(without a sound marker: all of them), and takes the first complete one that verifies, printing a
line for each folder it skips and why; when folders exist but none verifies it stops, saying what
to do. A named path must be complete and verify, or the run stops. Checkpoints written before
manifests existed (no sha256 in state.json) are resumed unverified, with a line saying so.
The folder must be on storage every learner node can write (a shared file system on clusters).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from soar_ray.errors import RunStopped

STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
PREFIX = "step-"
STAGING_PREFIX = ".staging-"
HASH_CHUNK_BYTES = 1 << 20
HASH_THREADS = 4
"""Files hashed at once: hashlib releases the GIL, so rank files hash in parallel."""


class CheckpointDamaged(RunStopped):
    """A checkpoint to resume from does not match its manifest, or none in the folder does."""


@dataclass(frozen=True)
class CheckpointState:
    """Driver-side state of a checkpoint; the data position is the step (batches are step-indexed)."""

    stage_index: int
    stage_name: str
    step: int
    policy_version: int
    time: float = 0.0
    manifest_sha256: str = ""
    """sha256 of the folder's manifest.json; empty in checkpoints written before manifests."""


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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_files(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(folder: Path) -> str:
    """Write folder/manifest.json listing every file in it (but the state); returns its sha256."""
    sealed = (folder / MANIFEST_FILE, folder / STATE_FILE)
    paths = sorted(path for path in folder.rglob("*") if path.is_file() and path not in sealed)
    files = {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": digest}
        for path, digest in zip(paths, _sha256_files(paths), strict=True)
    }
    text = json.dumps({"files": files}, indent=1) + "\n"
    write_atomic(folder / MANIFEST_FILE, text)
    return hashlib.sha256(text.encode()).hexdigest()


def find_damage(folder: Path, state: CheckpointState) -> str | None:
    """What is wrong with a complete checkpoint folder, in a few words, or None when it matches its
    manifest (or predates manifests: see `state.manifest_sha256`)."""
    if not state.manifest_sha256:
        return None
    try:
        text = (folder / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        return f"{MANIFEST_FILE} is missing"
    if hashlib.sha256(text).hexdigest() != state.manifest_sha256:
        return f"{MANIFEST_FILE} is damaged (its sha256 is not the one {STATE_FILE} holds)"
    files = json.loads(text)["files"]
    for name, entry in files.items():  # sizes first: cheap, and what a cut-short write leaves
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if (size := path.stat().st_size) != entry["bytes"]:
            return f"{name} is {size} bytes, the manifest says {entry['bytes']}"
    digests = _sha256_files([folder / name for name in files])
    for (name, entry), digest in zip(files.items(), digests, strict=True):
        if digest != entry["sha256"]:
            return f"{name} has other bytes than when it was written (sha256 differs)"
    return None


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
        """Seal `staging` with its manifest and state, rename it into place, move `latest`,
        prune old ones."""
        final = self.root / checkpoint_name(state.stage_index, state.step)
        state = replace(state, time=time.time(), manifest_sha256=write_manifest(staging))
        write_atomic(staging / STATE_FILE, json.dumps(asdict(state), indent=2))
        if final.exists():  # a re-run of the same step (after a resume) replaces it
            shutil.rmtree(final)
        os.replace(staging, final)
        write_atomic(self.root / LATEST, final.name + "\n")
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

    def _marked(self) -> Path | None:
        """The folder the `latest` marker names, if it is a complete checkpoint."""
        marker = self.root / LATEST
        if marker.is_file():
            folder = self.root / marker.read_text().strip()
            if folder.name.startswith(PREFIX) and read_state(folder) is not None:
                return folder
        return None

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the `latest` marker if it is sound, else a scan."""
        marked = self._marked()
        if marked is not None:
            return marked
        found = self.complete()
        return found[-1][1] if found else None

    def candidates(self) -> list[Path]:
        """Checkpoint folders in the order `auto` tries them: the `latest` marker's, then the older
        ones, newest first; without a sound marker all of them (names sort as (stage, step)).
        The marker names the newest checkpoint of the run that wrote last: after a resume from an
        older checkpoint, folders beyond it belong to the abandoned continuation."""
        if not self.root.is_dir():
            return []
        folders = [path for path in self.root.iterdir() if path.name.startswith(PREFIX)]
        folders = sorted((path for path in folders if path.is_dir()), reverse=True)
        marked = self._marked()
        return folders[folders.index(marked) :] if marked in folders else folders

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
    """`checkpoint.resume`: 'never' -> None; 'auto' -> the newest verified checkpoint (see the
    module docstring), or None when there is none; else that path, which must verify."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        state = read_state(path)
        if state is None:
            raise FileNotFoundError(
                f"checkpoint.resume: {path} is not a complete checkpoint (no valid {STATE_FILE})"
            )
        if (damage := find_damage(path, state)) is not None:
            raise CheckpointDamaged(
                f"checkpoint.resume: {path}: {damage}; name another checkpoint, or start over "
                "with checkpoint.resume: never"
            )
        return _announced(path, state)
    folders = manager.candidates()
    for folder in folders:
        state = read_state(folder)
        if state is None:
            damage = f"{STATE_FILE} is missing, unreadable or names another step"
        elif (damage := find_damage(folder, state)) is None:
            return _announced(folder, state)
        print(f"soar-ray: skipping {folder}: {damage}")
    if folders:
        raise CheckpointDamaged(
            f"checkpoint.resume: auto: no checkpoint in {manager.root} verifies (each is named "
            "above); start over with checkpoint.resume: never, or name a sound copy with "
            "checkpoint.resume: <path>"
        )
    return None


def _announced(folder: Path, state: CheckpointState) -> Path:
    if not state.manifest_sha256:
        print(f"soar-ray: {folder} has no {MANIFEST_FILE} (written before checkpoints had one): "
              "resuming from it unverified")  # fmt: skip
    return folder


def write_atomic(path: Path, text: str) -> None:
    """Write a file so readers see the old content or the new, never a mix."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)

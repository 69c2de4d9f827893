"""Atomic, verified checkpoints: only complete folders that match their manifest are resumed
from; retention; `latest`; what a resume may change; metrics rows taken back."""

import hashlib
import json

import pytest

from soar_ray.checkpoint import (
    CheckpointDamaged,
    CheckpointManager,
    CheckpointState,
    checkpoint_name,
    find_damage,
    read_state,
    resolve_resume,
)
from soar_ray.config import load_job
from soar_ray.metrics import drop_jsonl_rows
from soar_ray.stages.resume import changed_settings


def _save(manager, step, stage=0):
    staging = manager.begin(stage, step)
    (staging / "payload.txt").write_text(f"step {step}")
    (staging / "learners").mkdir()
    (staging / "learners" / "rank-00000.pt").write_bytes(bytes(range(256)) * (step + 1))
    return manager.commit(staging, CheckpointState(stage, f"{stage}-soar", step, step))


def test_commit_renames_marks_latest_and_keeps_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    paths = [_save(manager, step) for step in (10, 20, 30)]
    assert [p.name for p in paths] == [checkpoint_name(0, s) for s in (10, 20, 30)]
    assert not paths[0].exists() and paths[1].exists() and paths[2].exists()
    assert (tmp_path / "latest").read_text().strip() == paths[2].name
    assert manager.latest() == paths[2]
    assert read_state(paths[2]).step == 30
    assert not list(tmp_path.glob(".staging-*"))


def test_half_written_checkpoints_are_never_picked(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    good = _save(manager, 10)
    # A crash mid-write: staging folder never renamed.
    (manager.begin(0, 20) / "payload.txt").write_text("partial")
    # A folder renamed by hand without its state, and one with a damaged state file.
    (tmp_path / checkpoint_name(0, 30)).mkdir()
    broken = tmp_path / checkpoint_name(0, 40)
    broken.mkdir()
    (broken / "state.json").write_text('{"stage_index": 0, "step": 4')
    # A state that names another step (a copied folder) does not count either.
    copied = tmp_path / checkpoint_name(0, 50)
    copied.mkdir()
    (copied / "state.json").write_text(json.dumps(
        {"stage_index": 0, "stage_name": "0-soar", "step": 10, "policy_version": 10}
    ))  # fmt: skip
    # The marker points at a broken folder: auto falls back to the newest complete one.
    (tmp_path / "latest").write_text(broken.name)
    assert manager.latest() == good
    assert resolve_resume("auto", manager) == good
    assert resolve_resume("never", manager) is None


def test_auto_names_every_folder_it_skips(tmp_path, capsys):
    manager = CheckpointManager(tmp_path, keep_last=5)
    good = _save(manager, 10)
    stateless = tmp_path / checkpoint_name(0, 30)  # a folder renamed by hand
    stateless.mkdir()
    (tmp_path / "latest").unlink()  # without a marker auto tries every folder, newest first
    assert resolve_resume("auto", manager) == good
    reason = "state.json is missing, unreadable or names another step"
    assert capsys.readouterr().out == f"soar-ray: skipping {stateless}: {reason}\n"


def test_latest_marker_wins_and_explicit_paths_are_checked(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    first, second = _save(manager, 1), _save(manager, 2)
    (tmp_path / "latest").write_text(first.name)  # e.g. a rolled-back run
    assert manager.latest() == first
    assert resolve_resume(str(second), manager) == second
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        resolve_resume(str(tmp_path / "nowhere"), manager)


def test_empty_folder_resumes_nothing(tmp_path):
    assert resolve_resume("auto", CheckpointManager(tmp_path / "none", keep_last=1)) is None
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_staging_debris_is_removed_and_named(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.remove_staging() == []
    debris = manager.begin(0, 7)  # a checkpoint whose write never finished (a full disk)
    (debris / "engine.pt").write_bytes(b"\0" * 64)
    kept = _save(manager, 5)
    assert manager.remove_staging() == [] and not debris.exists()  # a commit prunes it too
    debris = manager.begin(0, 9)
    assert manager.remove_staging() == [debris] and not debris.exists() and kept.is_dir()


def test_commit_seals_every_file_in_a_manifest(tmp_path):
    folder = _save(CheckpointManager(tmp_path, keep_last=1), 3)
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["learners/rank-00000.pt", "payload.txt"]
    data = bytes(range(256)) * 4
    assert manifest["learners/rank-00000.pt"] == {
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()
    }  # fmt: skip
    state = read_state(folder)
    sealed = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert state.manifest_sha256 == sealed
    assert find_damage(folder, state) is None


def test_auto_goes_back_from_the_marker_and_stops_when_nothing_verifies(tmp_path, capsys):
    manager = CheckpointManager(tmp_path, keep_last=5)
    older, marked, beyond = _save(manager, 10), _save(manager, 20), _save(manager, 30)
    # A run resumed from step 20 wrote last: step 30 belongs to the continuation it abandoned.
    (tmp_path / "latest").write_text(marked.name)
    (marked / "learners" / "rank-00000.pt").write_bytes(b"cut")  # written as 256 x 21 bytes
    assert resolve_resume("auto", manager) == older
    out = capsys.readouterr().out
    assert out == (f"soar-ray: skipping {marked}: learners/rank-00000.pt is 3 bytes, the manifest "
                   "says 5376\n")  # fmt: skip
    (older / "payload.txt").unlink()
    (beyond / "manifest.json").write_text("{}")
    (tmp_path / "latest").unlink()  # no marker: every folder, newest first
    with pytest.raises(CheckpointDamaged, match="start over with checkpoint.resume: never"):
        resolve_resume("auto", manager)
    assert capsys.readouterr().out.splitlines() == [
        f"soar-ray: skipping {beyond}: manifest.json is damaged (its sha256 is not the one "
        "state.json holds)",
        f"soar-ray: skipping {marked}: learners/rank-00000.pt is 3 bytes, the manifest says 5376",
        f"soar-ray: skipping {older}: payload.txt is missing",
    ]  # fmt: skip


def test_a_checkpoint_without_manifest_is_resumed_unverified_saying_so(tmp_path, capsys):
    folder = tmp_path / checkpoint_name(0, 5)
    folder.mkdir()
    state = {"stage_index": 0, "stage_name": "0-soar", "step": 5, "policy_version": 5}
    (folder / "state.json").write_text(json.dumps(state))  # as written before manifests
    assert resolve_resume(str(folder), CheckpointManager(tmp_path, keep_last=1)) == folder
    assert "has no manifest.json (written before checkpoints had one)" in capsys.readouterr().out


def test_drop_jsonl_rows_keeps_the_rest_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"stage": "a", "step": step} for step in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "a", "st')
    assert drop_jsonl_rows(path, lambda row: row["step"] <= 2) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
    assert drop_jsonl_rows(path, lambda row: True) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert drop_jsonl_rows(tmp_path / "none.jsonl", lambda row: True) == 0


def _tiny(*overrides):
    return load_job("jobs/tiny_soar_grpo.yaml", ["output_dir=runs/x", *overrides])


def test_a_resume_may_change_schedules_and_later_stages_only():
    saved = _tiny()
    harmless = _tiny("output_dir=elsewhere", "checkpoint.every=5", "checkpoint.keep_last=9",
                     "logging.every=3", "stages.0.num_steps=80", "cluster.call_timeout_s=10",
                     "data.num_workers=2", "rewards.jpeg_compressibility.batch_size=4",
                     "stages.0.optimizer.on_nonfinite=skip_step", "stages.1.optimizer.lr=1.0e-5",
                     "stages.1.rewards={jpeg_incompressibility: 1}")  # fmt: skip
    assert changed_settings(saved, harmless, stage_index=0) == []
    changed = _tiny("seed=7", "stages.0.optimizer.lr=5.0e-4", "stages.0.optimizer.betas=[0.8, 0.9]",
                    "data.batch_size=2", "cluster.num_learners=1",
                    "model.resolution=32")  # fmt: skip
    assert changed_settings(saved, changed, stage_index=0) == [
        "seed 42 -> 7",
        "model.resolution 64 -> 32",
        "data.batch_size 4 -> 2",
        "stages.0.optimizer.lr 0.001 -> 0.0005",
        "stages.0.optimizer.betas [0.9, 0.999] -> [0.8, 0.9]",
        "cluster.num_learners 2 -> 1",
    ]
    # Resumed inside the second stage, the first is finished: even its length is fixed.
    later = _tiny("stages.0.num_steps=80", "stages.1.num_epochs=50")
    assert changed_settings(saved, later, stage_index=1) == ["stages.0.num_steps 40 -> 80"]

"""Atomic checkpoints: only complete folders are ever resumed from; retention; `latest`."""

import json

import pytest

from soar_ray.checkpoint import (
    CheckpointManager,
    CheckpointState,
    checkpoint_name,
    read_state,
    resolve_resume,
)


def _save(manager, step, stage=0):
    staging = manager.begin(stage, step)
    (staging / "payload.txt").write_text(f"step {step}")
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

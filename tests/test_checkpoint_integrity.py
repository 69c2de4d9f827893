"""Checkpoint integrity and honest resume on real tiny runs (DeepSpeed ZeRO-2 learners on gloo, a
local Ray): every kind of damage to a checkpoint is found and `auto` falls back past it, a damaged
path or changed settings stop the run before any actor, and a resume from the fallback takes back
the metrics rows after it and ends with the weights of an uninterrupted run."""

import json
import re
import shutil

import pytest
import ray
import torch
from helpers import tensorboard_events
from safetensors.torch import load_file

from soar_ray.checkpoint import (
    CheckpointDamaged,
    CheckpointManager,
    checkpoint_name,
    find_damage,
    read_state,
    resolve_resume,
)
from soar_ray.config import load_job
from soar_ray.stages.pipeline import run_pipeline
from soar_ray.stages.resume import SettingsChanged

pytestmark = pytest.mark.slow

FAST = ["data.synthetic.num_images=32", "logging.progress_bar=false", "logging.tensorboard=false",
        "cluster.num_rollout_workers=0", "logging.sample_every=0"]  # fmt: skip
WEIGHTS = "0-soar/transformer/diffusion_pytorch_model.safetensors"


def _job(run_dir, *overrides):
    """The tiny SOAR job without rollout workers, a checkpoint after every step."""
    return load_job("jobs/tiny.yaml", [f"output_dir={run_dir}", *FAST, "checkpoint.every=1",
                                       *overrides])  # fmt: skip


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(ray_local, tmp_path_factory):
    """A run of four steps, uninterrupted, with a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("straight")
    run_pipeline(_job(run_dir, "stages.0.num_steps=4", "checkpoint.keep_last=4"), run_dir)
    return run_dir


def _cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CUT = r"is \d+ bytes, the manifest says \d+"
DAMAGE = [
    ("learners/rank-00000.pt", _cut_short, CUT),
    ("learners/engine/mp_rank_00_model_states.pt", _cut_short, CUT),
    ("transformer/diffusion_pytorch_model.safetensors", _flip_a_byte,
     r"has other bytes than when it was written \(sha256 differs\)"),
    ("learners/engine/zero_pp_rank_1_mp_rank_00_optim_states.pt", lambda p: p.unlink(),
     "is missing"),
    ("manifest.json", _flip_a_byte, None),
    ("manifest.json", lambda p: p.unlink(), None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "damage", "reason"), DAMAGE)
def test_damage_is_found_and_auto_falls_back_past_it(straight, tmp_path, capsys, name, damage,
                                                     reason):  # fmt: skip
    root = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", root)
    newest, previous = root / checkpoint_name(0, 4), root / checkpoint_name(0, 3)
    damage(newest / name)
    reason = re.escape(name) + " " + (reason or r"is (damaged|missing)\b.*")
    assert resolve_resume("auto", CheckpointManager(root, keep_last=4)) == previous
    assert re.fullmatch(f"soar-ray: skipping {re.escape(str(newest))}: {reason}\n",
                        capsys.readouterr().out)  # fmt: skip
    with pytest.raises(CheckpointDamaged) as error:
        resolve_resume(str(newest), CheckpointManager(root, keep_last=4))
    advice = "name another checkpoint, or start over with checkpoint.resume: never"
    assert re.fullmatch(f"checkpoint.resume: {re.escape(str(newest))}: {reason}; {advice}",
                        str(error.value))  # fmt: skip


def test_the_manifest_lists_every_file_of_a_checkpoint(straight):
    folder = straight / "checkpoints" / checkpoint_name(0, 4)
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = {path.relative_to(folder).as_posix(): path.stat().st_size
               for path in folder.rglob("*") if path.is_file()}  # fmt: skip
    assert on_disk.keys() - listed.keys() == {"manifest.json", "state.json"}
    assert {name: entry["bytes"] for name, entry in listed.items()} == {
        name: size for name, size in on_disk.items() if name in listed
    }  # fmt: skip
    assert {"config.yaml", "learners/rank-00000.pt", "learners/rank-00001.pt",
            "transformer/diffusion_pytorch_model.safetensors"} <= listed.keys()  # fmt: skip
    assert find_damage(folder, read_state(folder)) is None


def test_changed_settings_or_a_damaged_path_stop_before_any_actor(straight, tmp_path):
    shutil.copytree(straight / "checkpoints", tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / checkpoint_name(0, 4)
    changed = _job(tmp_path, "stages.0.num_steps=4", "seed=7", "stages.0.optimizer.lr=5.0e-4")
    with pytest.raises(SettingsChanged) as error:
        run_pipeline(changed, tmp_path)
    assert str(error.value).startswith(
        f"checkpoint.resume: {newest} was written with other settings: seed 42 -> 7; "
        "stages.0.optimizer.lr 0.001 -> 0.0005; a resume continues"
    )  # fmt: skip
    with pytest.raises(SettingsChanged, match=r"stages.0.num_steps: 3 is below step 4 of the "):
        run_pipeline(_job(tmp_path, "stages.0.num_steps=3"), tmp_path)
    _cut_short(newest / "learners" / "rank-00001.pt")
    with pytest.raises(CheckpointDamaged, match=r": learners/rank-00001.pt is \d+ bytes, the "):
        run_pipeline(_job(tmp_path, "stages.0.num_steps=4", f"checkpoint.resume={newest}"),
                     tmp_path)  # fmt: skip
    assert not [a for a in ray.util.list_named_actors() if a.startswith(("learner-", "rollout-"))]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_past_lost_checkpoints_rewinds_metrics_and_continues_exactly(straight, tmp_path,
                                                                           capsys):  # fmt: skip
    # A run killed after step 3 whose two newest checkpoints are lost: one deleted, one cut short.
    run_pipeline(_job(tmp_path, "stages.0.num_steps=3", "logging.tensorboard=true"), tmp_path)
    checkpoints = tmp_path / "checkpoints"
    shutil.rmtree(checkpoints / checkpoint_name(0, 3))
    _cut_short(checkpoints / checkpoint_name(0, 2) / "learners" / "rank-00001.pt")
    capsys.readouterr()
    # More steps and a longer keep_last are safe changes: the run resumes from step 1.
    run_pipeline(_job(tmp_path, "stages.0.num_steps=4", "checkpoint.keep_last=4",
                      "logging.tensorboard=true"), tmp_path)  # fmt: skip
    out = capsys.readouterr().out
    skipped = checkpoints / checkpoint_name(0, 2)
    assert f"soar-ray: skipping {skipped}: learners/rank-00001.pt is " in out
    assert "soar-ray: metrics.jsonl: dropped 2 rows after stage 0-soar step 1, where this run " \
        "resumes" in out  # fmt: skip
    assert "soar-ray: tensorboard: rewritten from metrics.jsonl, 1 rows" in out
    assert f"soar-ray: resumed from {checkpoints / checkpoint_name(0, 1)} " in out
    rows = _rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    # TensorBoard holds each step once, as metrics.jsonl does (steps 2-3 of the first run gone).
    scalars, _ = tensorboard_events(tmp_path)
    assert [step for step, _ in scalars["0-soar/loss"]] == [1, 2, 3, 4]
    assert [value for _, value in scalars["0-soar/loss"]] == pytest.approx(
        [row["loss"] for row in rows], rel=1e-6)  # fmt: skip
    expected, resumed = load_file(straight / WEIGHTS), load_file(tmp_path / WEIGHTS)
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key
    assert find_damage(skipped, read_state(skipped)) is None  # written again, whole

"""Inputs that could run code or leak access: checkpoint files load as data only (a planted file
is refused, naming it), and the Ray token an embedded run makes is readable by its user only.
The learners' rendezvous binding is tested on a real group in test_soar_stage.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soar_ray.config import OptimizerConfig, load_job
from soar_ray.errors import UnsafeCheckpointError
from soar_ray.workers.engine import LocalEngine

REPO = Path(__file__).resolve().parents[1]


def _assert_refused(load, path: Path, marker: Path) -> None:
    with pytest.raises(UnsafeCheckpointError) as refused:
        load()
    message = str(refused.value)
    assert message.startswith(f"{path}: refused to load: it holds the Python object posix.mkdir,")
    assert "\n" not in message
    assert not marker.exists()


def test_a_planted_file_runs_its_code_when_loaded_unsafely(tmp_path, plant):
    # The control for the tests below: the payload is real.
    plant(tmp_path / "planted.pt", tmp_path / "ran")
    torch.load(tmp_path / "planted.pt", weights_only=False)
    assert (tmp_path / "ran").is_dir()


def test_local_engine_refuses_a_planted_checkpoint(tmp_path, plant):
    params = list(torch.nn.Linear(3, 1).parameters())
    engine = LocalEngine(params, OptimizerConfig())
    engine.save_checkpoint(tmp_path, "engine")
    engine.load_checkpoint(tmp_path, "engine")  # its own file loads
    path = tmp_path / "engine" / "local_engine.pt"
    plant(path, tmp_path / "ran")
    _assert_refused(lambda: engine.load_checkpoint(tmp_path, "engine"), path, tmp_path / "ran")


def test_learner_refuses_a_planted_rank_state(tmp_path, plant):
    from soar_ray.build import build_learner, build_sd3

    job = load_job("jobs/tiny.yaml", [f"output_dir={tmp_path}", "stages.0.ema.enabled=true"])
    learner = build_learner(job, build_sd3(job, components=("transformer",)), distributed=False)
    learner.setup_stage(0)
    learner.save_checkpoint(tmp_path / "learners")
    learner.load_checkpoint(tmp_path / "learners")  # its own files load: RNG state, EMA
    path = tmp_path / "learners" / "rank-00000.pt"
    plant(path, tmp_path / "ran")
    _assert_refused(lambda: learner.load_checkpoint(tmp_path / "learners"), path, tmp_path / "ran")


def test_deepspeed_engine_files_load_weights_only(tmp_path, plant):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from soar_ray.workers.deepspeed_checkpoint import WeightsOnlyCheckpointEngine

    engine = WeightsOnlyCheckpointEngine()
    # What a ZeRO optimizer-state file holds besides tensors (the records it pickles).
    state = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
             "single_partition_of_fp32_groups": [torch.arange(4.0)]}  # fmt: skip
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = engine.load(str(tmp_path / "optim_states.pt"))
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["loss_scaler"].cur_scale == 1.0
    assert loaded["param_slice_mappings"] == state["param_slice_mappings"]
    assert torch.equal(loaded["single_partition_of_fp32_groups"][0], torch.arange(4.0))
    path = tmp_path / "model_states.pt"
    plant(path, tmp_path / "ran")
    _assert_refused(lambda: engine.load(str(path)), path, tmp_path / "ran")


@pytest.mark.slow
def test_a_token_file_ray_makes_for_a_local_run_is_private(tmp_path):
    # An embedded Ray in a fresh home: token auth is on by default and there is no token yet, so
    # Ray writes ~/.ray/auth_token, under umask 022 with mode 0644.
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    script = ("import os; os.umask(0o022)\n"
              "from soar_ray.cluster.session import ray_session\n"
              "from soar_ray.config import ClusterConfig\n"
              "with ray_session(ClusterConfig()): pass\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, check=True, timeout=120,
                   capture_output=True)  # fmt: skip
    token = tmp_path / ".ray" / "auth_token"
    assert token.read_text().strip()
    assert token.stat().st_mode & 0o777 == 0o600

"""One run per run folder: the lock, its stale-holder takeover, --force, and `soar-ray run` refusing
a second run before it writes anything."""

import json
import os
import socket
import subprocess
import sys

import pytest

from soar_ray.cli import main
from soar_ray.errors import RunFolderBusy
from soar_ray.run_lock import LOCK_FILE, RunFolderLock


def _hold(run_dir, pid, host=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "ray_job_id": "raysubmit_1",
              "started": "2026-11-30 06:00:00 UTC"}  # fmt: skip
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))


def _gone_pid():
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_lock_is_held_for_the_block_and_released(tmp_path):
    with RunFolderLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()} on "):
            RunFolderLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(ValueError), RunFolderLock(tmp_path):
        raise ValueError("a failed run releases the folder too")
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_gone_holder_on_this_host_is_taken_over(tmp_path, capsys):
    _hold(tmp_path, _gone_pid())
    with RunFolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over the lock of a run that is gone" in capsys.readouterr().out


def test_another_hosts_holder_needs_force(tmp_path, capsys):
    _hold(tmp_path, 12345, host="gpu-node-7")
    with pytest.raises(
        RunFolderBusy, match="pid 12345 on gpu-node-7, Ray job raysubmit_1.*--force"
    ):
        RunFolderLock(tmp_path).__enter__()
    with RunFolderLock(tmp_path, force=True):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == socket.gethostname()
    assert "--force: taking over the lock of pid 12345 on gpu-node-7" in capsys.readouterr().out


def test_a_second_run_stops_before_writing_anything(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _hold(run_dir, os.getpid())  # a live holder: this very process
    code = main(["run", "jobs/tiny.yaml", "--set", f"output_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "is in use by another soar-ray run" in err and "Traceback" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # no config.yaml written

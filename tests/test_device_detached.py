"""benchmarks/device_detached.sh: a command longer than one device call runs detached; each call
waits up to its seconds, brings the command's output folder back, and starts the command again
only when it is gone without an exit status."""

import os
import signal
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_detached.sh"
# The command writes into the OUT it is given, and notes each start.
COMMAND = ["bash", "-c", 'echo start >> "$OUT/starts.txt"; pwd > "$OUT/cwd.txt"; ls > "$OUT/ls.txt"; '
           'sleep "$1"; echo done > "$OUT/done.txt"', "command"]  # fmt: skip


def call(tmp_path, out, seconds, *args):
    env = {**os.environ, "OUT": str(out), "DETACHED_HOME": str(tmp_path / "detached")}
    checkout = tmp_path / "checkout"  # the folder a device call runs in
    checkout.mkdir(exist_ok=True)
    (checkout / "bench.txt").write_text("")
    return subprocess.run(["bash", str(SCRIPT), "job", str(seconds), *args], env=env,
                          cwd=checkout, capture_output=True, text=True, check=True).stdout  # fmt: skip


def test_a_detached_command_outlives_a_call_and_its_output_comes_back(tmp_path):
    first = call(tmp_path, tmp_path / "call-1", 2, *COMMAND, "5")
    assert "detached: started job" in first and "ended" not in first
    assert (tmp_path / "call-1" / "starts.txt").read_text() == "start\n"
    # It runs in a copy of the call's folder, which the next call may replace.
    tree = tmp_path / "detached" / "job" / "tree"
    assert (tmp_path / "call-1" / "cwd.txt").read_text() == f"{tree}\n"
    assert (tmp_path / "call-1" / "ls.txt").read_text() == "bench.txt\n"
    assert not (tmp_path / "call-1" / "done.txt").exists()  # still running when the call ended
    second = call(tmp_path, tmp_path / "call-2", 30, *COMMAND, "2")
    assert "is running" in second and "ended with exit 0" in second
    assert (tmp_path / "call-2" / "done.txt").read_text() == "done\n"
    assert (tmp_path / "call-2" / "starts.txt").read_text() == "start\n"  # not started again
    assert (tmp_path / "call-2" / "detached-log.txt").is_file()
    third = call(tmp_path, tmp_path / "call-3", 30, *COMMAND, "2")
    assert "ended earlier with exit 0" in third


def test_a_command_ended_with_its_call_is_started_again(tmp_path):
    call(tmp_path, tmp_path / "call-1", 1, *COMMAND, "30")
    pid = int((tmp_path / "detached" / "job" / "pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # what a device that ends a call's processes does
    time.sleep(0.5)
    again = call(tmp_path, tmp_path / "call-2", 30, *COMMAND, "0")
    assert "is gone without an exit status; starting it again" in again
    assert "ended with exit 0" in again
    assert (tmp_path / "call-2" / "starts.txt").read_text() == "start\nstart\n"

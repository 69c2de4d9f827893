"""soar_ray.algo imports torch only: no ray, deepspeed or diffusers (STYLE 1)."""

import pkgutil
import subprocess
import sys

import pytest

import soar_ray.algo

FORBIDDEN = {"ray", "deepspeed", "diffusers"}
MODULES = ["soar_ray.algo"] + [
    f"soar_ray.algo.{info.name}" for info in pkgutil.iter_modules(soar_ray.algo.__path__)
]
CHECK = (
    "import importlib, sys; importlib.import_module({module!r}); "
    "print(sorted({{name.split('.')[0] for name in sys.modules}} & {forbidden!r}))"
)


@pytest.mark.parametrize("module", MODULES)
def test_algo_module_imports_no_framework(module):
    """A fresh interpreter, so modules other tests imported cannot hide or cause a hit."""
    code = CHECK.format(module=module, forbidden=FORBIDDEN)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{module} imported {result.stdout.strip()}"


def test_core_modules_are_checked():
    assert {"soar_ray.algo.flow", "soar_ray.algo.soar", "soar_ray.algo.grpo"} <= set(MODULES)

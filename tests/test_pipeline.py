"""End to end: `soar-ray run` on the tiny job, in process (CPU, random weights)."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel

from soar_ray.cli import main


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_job_runs_and_loss_falls(tmp_path):
    run_dir = tmp_path / "run"
    code = main([
        "run", "jobs/tiny.yaml", "--set", f"output_dir={run_dir}",
        "--set", "stages.0.num_steps=40", "--set", "logging.sample_every=20",
        "--set", "logging.num_sample_steps=4", "--set", "data.synthetic.num_images=64",
    ])  # fmt: skip
    assert code == 0
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"loss", "loss_main", "loss_aux", "samples_per_s"} <= rows[0].keys()
    first = sum(r["loss"] for r in rows[:8]) / 8
    last = sum(r["loss"] for r in rows[-8:]) / 8
    assert last < 0.9 * first, (first, last)
    samples = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert samples == [f"0-soar-step-0000{s:02d}.png" for s in (0, 20, 40)]
    assert (run_dir / "config.yaml").is_file()
    transformer = SD3Transformer2DModel.from_pretrained(run_dir / "0-soar" / "transformer")
    assert all(torch.isfinite(p).all() for p in transformer.parameters())


def test_bad_override_is_one_clear_line(tmp_path, capsys):
    code = main(["run", "jobs/tiny.yaml", "--set", "stages.0.lambda_aux=-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stages.0.lambda_aux" in err and "Traceback" not in err


def test_grpo_stage_refused_before_any_work(tmp_path, capsys):
    code = main(["run", "jobs/grpo.yaml", "--set", f"output_dir={tmp_path / 'r'}",
                 "--set", "data.prompts.path=../shared/data/prompts/ocr_test.txt"])  # fmt: skip
    assert code == 2
    assert "stages.0.algorithm" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

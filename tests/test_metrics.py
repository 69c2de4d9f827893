import json
import math

import numpy as np
import pytest
import torch
from helpers import tensorboard_events
from PIL import Image

from soar_ray.metrics import MetricsLogger, save_image_grid, to_uint8_images


def test_jsonl_log_keeps_every_step_and_nulls_non_finite(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log(1, {"loss": 0.5, "loss_aux": torch.tensor(0.25)})
        logger.log(2, {"loss": math.nan, "lr": 1e-3})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss_aux"] == 0.25
    assert rows[1]["loss"] is None and rows[1]["lr"] == 1e-3
    assert any((tmp_path / "tensorboard").iterdir())


def test_to_uint8_maps_range_endpoints():
    pixels = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    out = to_uint8_images(pixels)
    assert out.shape == (1, 2, 2, 3)
    assert out[0, :, :, 0].ravel().tolist() == [0, 128, 255, 255]


def test_grid_layout_and_tile_content(tmp_path):
    images = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    images[4] = 255  # the fifth tile is white
    path = save_image_grid(images, tmp_path / "grid.png", num_columns=3, min_tile=16)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 16, 3 * 16, 3)
    assert grid[16:, 16:32].min() == 255 and grid[:16, :16].max() == 0


def test_grid_rejects_caption_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        save_image_grid(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "g.png", captions=["a"])


def test_tensorboard_is_rewritten_from_the_rows_and_grids_a_resume_keeps(tmp_path):
    from soar_ray.metrics import drop_jsonl_rows, grid_file, rebuild_tensorboard

    grid = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        for step in (1, 2, 3, 4):  # a SOAR stage killed after step 4
            logger.log(step, {"stage": "0-soar", "loss": step / 8, "loss_aux": math.nan})
            if step % 2 == 0:
                path = save_image_grid(grid, tmp_path / "samples" / grid_file("0-soar-step", step))
                logger.log_image("0-soar-step", path, step)
        logger.log(2, {"stage": "1-grpo", "kl": 0.5})  # the next stage's steps count from 1
    scalars, images = tensorboard_events(tmp_path)
    assert scalars["0-soar/loss"] == [(1, 0.125), (2, 0.25), (3, 0.375), (4, 0.5)]
    assert scalars["1-grpo/kl"] == [(2, 0.5)] and images == {"samples": [2, 4]}
    # It resumes from its step-2 checkpoint: rows and grids past it go.
    keep = lambda stage, step: stage == "0-soar" and step <= 2  # noqa: E731
    assert drop_jsonl_rows(tmp_path / "metrics.jsonl", lambda r: keep(r["stage"], r["step"])) == 3
    assert rebuild_tensorboard(tmp_path, keep) == 2
    scalars, images = tensorboard_events(tmp_path)
    # The NaN auxiliary losses were nulls in metrics.jsonl: not written again.
    assert scalars == {"0-soar/loss": [(1, 0.125), (2, 0.25)]}
    assert images == {"samples": [2]}


def test_a_grid_is_tagged_by_its_kind_not_by_its_stage_name():
    from soar_ray.metrics import grid_tag

    assert grid_tag("1-grpo-eval") == "eval"
    # A stage the user named "eval-warmup" trains: its step grids are samples.
    assert grid_tag("0-eval-warmup-step") == "samples" and grid_tag("1-grpo-epoch") == "samples"

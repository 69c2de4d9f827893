import json
import math

import numpy as np
import pytest
import torch
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

"""Run metrics: a JSONL log, TensorBoard event files and sample-image grids in the run folder, and
Ray metrics (`soar_ray_*` gauges) that the head's Prometheus endpoint and the dashboard show."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image, ImageDraw, ImageFont
from ray.util.metrics import Gauge

from soar_ray.checkpoint import write_atomic

RAY_METRIC_PREFIX = "soar_ray_"
RAY_METRIC_RENAMES = {"samples_per_s": "samples_per_second"}
RAY_METRIC_HELP = {
    "step": "Stage iteration: SOAR step or GRPO epoch",
    "loss": "Training loss of the last logged step",
    "loss_aux": "SOAR auxiliary (self-correction) loss",
    "samples_per_second": "Training samples per second over all learners",
    "policy_version": "Optimizer updates of the policy so far",
    "staleness": "Policy versions between the rollout policy and the learners",
    "checkpoint_seconds": "Seconds the last checkpoint took",
    "reward_mean": "Mean weighted reward of the last GRPO epoch's rollouts",
    "kl": "Mean KL to the reference policy over the last GRPO epoch",
    "clip_fraction": "Fraction of clipped policy ratios over the last GRPO epoch",
    "log_ratio_first": "Mean |log ratio| at the first update of the last GRPO epoch (0 on-policy)",
    "epoch_images_per_s": "Images per second of the last GRPO epoch, end to end",
}
RAY_TAG_KEYS = ("job", "stage")
_GAUGES: dict[str, Gauge] = {}


class MetricsLogger:
    """Writes one JSON object per step to `metrics.jsonl` and scalars to TensorBoard; with
    `ray_metrics`, and Ray initialised in this process, also exports them as Ray gauges."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        jsonl: bool = True,
        tensorboard: bool = True,
        ray_metrics: bool = False,
        job_name: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Line-buffered so a crashed run keeps every step it finished.
        self._jsonl = None
        if jsonl:
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._ray = None
        if ray_metrics and ray.is_initialized():
            self._ray = RayMetricsSink(job_name or self.run_dir.name)

    def log(self, step: int, metrics: dict[str, Any], walltime: float | None = None) -> None:
        """Record `metrics` for `step` (at `walltime`, default now); non-finite losses are kept as
        they are (null in JSON). TensorBoard files a stage's scalars under `<stage>/<key>`, so
        each stage has curves of its own over its own steps."""
        record = {"step": step, "time": time.time() if walltime is None else walltime, **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_jsonable(record)) + "\n")
        if self._tb is not None:
            stage = metrics.get("stage")
            prefix = f"{stage}/" if isinstance(stage, str) else ""
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(prefix + key, value, step, walltime=record["time"])
        if self._ray is not None:
            self._ray.record(step, metrics)

    def log_image(self, name: str, path: str | Path, step: int) -> None:
        """Add a saved PNG grid (`name` as in its file name) to TensorBoard's image tab."""
        if self._tb is not None:
            array = np.asarray(Image.open(path).convert("RGB"))
            self._tb.add_image(grid_tag(name), array, step, dataformats="HWC")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._ray is not None:
            self._ray.close()
            self._ray = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SAMPLE_GRID = re.compile(r"(?P<name>(?P<stage>.+)-(?:step|epoch|eval))-(?P<step>\d{6})\.png")
"""A sample grid's file name under samples/: `<stage>-step|epoch|eval-<step>.png`."""


def grid_file(name: str, step: int) -> str:
    """The file name of grid `name` (`<stage>-step|epoch|eval`) at `step`, under samples/."""
    return f"{name}-{step:06d}.png"


def grid_tag(name: str) -> str:
    """TensorBoard's image tag of a grid: evaluation grids (`<stage>-eval`) under `eval`, the rest
    `samples` (a stage whose own name holds "eval" is still a stage)."""
    return "eval" if name.endswith("-eval") else "samples"


def rebuild_tensorboard(run_dir: Path, keep: Callable[[str, int], bool]) -> int:
    """TensorBoard's event files written again from metrics.jsonl and the grids under samples/
    that `keep(stage, step)` accepts: a resumed run then shows each step once. (A killed run may
    have flushed events past the point it resumes from, and may not have flushed some before
    it.) Returns the rows written."""
    folder = run_dir / "tensorboard"
    if folder.is_dir():
        shutil.rmtree(folder)
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    grids = sorted((int(m["step"]), m["name"], file) for file in (run_dir / "samples").glob("*.png")
                   if (m := SAMPLE_GRID.fullmatch(file.name)) and keep(m["stage"], int(m["step"])))  # fmt: skip
    with MetricsLogger(run_dir, jsonl=False, tensorboard=True) as logger:
        for row in rows:
            metrics = {k: v for k, v in row.items() if k not in ("step", "time") and v is not None}
            logger.log(row["step"], metrics, walltime=row.get("time"))
        for step, name, file in grids:
            logger.log_image(name, file, step)
    return len(rows)


def drop_jsonl_rows(path: Path, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Drop the rows of a JSONL file that `keep` rejects, and any line that is not a JSON object (a
    kill mid-write cuts the last one short); atomic: the kept lines go to a new file that replaces
    the old. Returns the lines dropped (0 leaves the file untouched; no file is no rows)."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and keep(row):
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        write_atomic(path, "".join(kept))
    return dropped


def ray_metric_name(key: str) -> str:
    """`soar_ray_<key>` in Prometheus' alphabet; `samples_per_s` becomes `samples_per_second`."""
    key = RAY_METRIC_RENAMES.get(key, key)
    return RAY_METRIC_PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def ray_gauge(name: str) -> Gauge:
    """The process-wide gauge `name`, created on first use and tagged by job and stage."""
    if name not in _GAUGES:
        short = name.removeprefix(RAY_METRIC_PREFIX)
        help_text = RAY_METRIC_HELP.get(short, f"Training metric {short}")
        _GAUGES[name] = Gauge(name, description=help_text, tag_keys=RAY_TAG_KEYS)
    return _GAUGES[name]


def ray_report_interval_s() -> float:
    """Seconds between exports of a process's metrics to its node's agent (Ray floors it at 1)."""
    # Ray reads its config from RAY_<name> variables, names in their own lower case.
    interval_ms = os.environ.get("RAY_metrics_report_interval_ms", "10000")  # noqa: SIM112
    return max(float(interval_ms) / 1000, 1.0)


class RayMetricsSink:
    """Numeric scalars as Ray gauges `soar_ray_<name>` (Prometheus: `ray_soar_ray_<name>`).

    Ray's agent forgets a gauge that was not set for two report intervals, so a thread sets the
    latest values again every half interval: a slow step or epoch stays on the dashboard. A
    non-finite value (which Ray drops) removes its gauge until the next finite one.
    """

    def __init__(self, job: str, *, refresh_s: float | None = None) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayMetricsSink: Ray is not initialised in this process")
        self.job, self.stage = job, ""
        self._latest: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        period = refresh_s if refresh_s is not None else ray_report_interval_s() / 2
        self._thread = threading.Thread(target=self._keep_alive, args=(period,), daemon=True,
                                        name="soar-ray-metrics")  # fmt: skip
        self._thread.start()

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        """Set `soar_ray_step` and a gauge per numeric scalar of `metrics` (tag `stage` from it)."""
        values = {"step": step, **metrics}
        with self._lock:
            stage = str(metrics.get("stage", ""))
            if stage != self.stage:
                # The previous stage's series stop being refreshed and leave the dashboard.
                self._latest.clear()
                self.stage = stage
            for key, value in values.items():
                scalar = _scalar(value)
                if scalar is None:
                    continue
                name = ray_metric_name(key)
                if math.isfinite(scalar):
                    self._latest[name] = scalar
                else:
                    self._latest.pop(name, None)
            self._set_all()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _set_all(self) -> None:
        tags = {"job": self.job, "stage": self.stage}
        for name, value in self._latest.items():
            ray_gauge(name).set(value, tags=tags)

    def _keep_alive(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            with self._lock:
                self._set_all()


def _scalar(value: Any) -> float | None:
    """A metric value as a float, or None for text, flags and arrays."""
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return None


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def to_uint8_images(pixels_BCHW: torch.Tensor) -> np.ndarray:
    """Map decoded pixels in [-1, 1] to uint8 HWC arrays, shape [B, H, W, 3]."""
    pixels = ((pixels_BCHW.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image_grid(
    images_BHWC: np.ndarray,
    path: str | Path,
    *,
    captions: list[str] | None = None,
    num_columns: int | None = None,
    min_tile: int = 128,
) -> Path:
    """Save images as one PNG grid, each tile upscaled to `min_tile` px with its caption below."""
    num_images = len(images_BHWC)
    if num_images == 0:
        raise ValueError("save_image_grid: no images to save")
    if captions is not None and len(captions) != num_images:
        raise ValueError(f"save_image_grid: {num_images} images but {len(captions)} captions")
    num_columns = num_columns or math.ceil(math.sqrt(num_images))
    num_rows = math.ceil(num_images / num_columns)
    height, width = images_BHWC.shape[1:3]
    scale = max(1, math.ceil(min_tile / max(height, width)))
    tile_w, tile_h = width * scale, height * scale
    text_h = 24 if captions else 0
    grid = Image.new("RGB", (num_columns * tile_w, num_rows * (tile_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, image in enumerate(images_BHWC):
        x, y = (i % num_columns) * tile_w, (i // num_columns) * (tile_h + text_h)
        tile = Image.fromarray(image).resize((tile_w, tile_h), Image.NEAREST)
        grid.paste(tile, (x, y))
        if captions:
            draw.text(
                (x + 2, y + tile_h + 4), _fit(draw, captions[i], font, tile_w - 4), "black", font
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."

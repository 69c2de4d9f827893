"""`soar-ray rewards check | score`: try every configured reward, score a folder of images.

`rewards check JOB.yaml` loads each reward the job configures (`rewards:` and the rewards of its
GRPO stages) in this process, scores one rendered probe image, and prints reward, backend,
checkpoint, status, time and the probe's score; it exits 1 when any reward fails.

`rewards score --reward NAME --prompts FILE --images DIR` scores every image of DIR and writes one
Parquet row per image (image, prompt_index, prompt, score, dropped, the reward's components).
Naming rule: an image's file name starts with the 0-based index of its prompt in FILE (blank and
'#' lines do not count), alone or followed by `_` or `-` and anything: `7.png`, `7_0.png` and
`7-seed3.jpg` are all images of prompt 7. Images are .png, .jpg, .jpeg, .webp or .bmp files; other
files are ignored, and an image whose name breaks the rule or whose index is past the last prompt
is an error.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageDraw, ImageFont

import rewards
from rewards.base import MissingCheckpointError
from soar_ray.config import JobConfig, RewardConfig, load_job
from soar_ray.data.dataset import IMAGE_ERRORS
from soar_ray.data.prompts import PROMPT_KINDS, load_prompt_set
from soar_ray.workers.scorer import RewardScoreError, RewardScorer, reward_options

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
IMAGE_NAME = re.compile(r"^(\d+)(?:[_-].*)?$")
# Options that name a checkpoint file or folder, over all rewards in rewards/.
CHECKPOINT_OPTIONS = (
    "checkpoint", "model_path", "processor_path", "clip_path", "predictor_path", "med_config",
    "tokenizer_path", "yolo_cfg", "yolo_weights", "mmdet_config", "mmdet_checkpoint",
    "clip_checkpoint", "model_dir",
)  # fmt: skip
PROBE_PROMPT = 'a stop sign that says "SOAR"'
# One metadata row every reward accepts: an OCR target and a GenEval row.
PROBE_METADATA = {
    "target_text": "SOAR",
    "tag": "single_object",
    "include": [{"class": "stop sign", "count": 1}],
    "prompt": PROBE_PROMPT,
}
USER_ERRORS = (ValueError, FileNotFoundError, RewardScoreError)


def add_reward_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `rewards check` and `rewards score` to the `soar-ray` command line."""
    group = subparsers.add_parser("rewards", help="check and run the reward models",
                                  description=__doc__.split("\n\n")[0])  # fmt: skip
    commands = group.add_subparsers(dest="rewards_command", required=True)
    check = commands.add_parser("check", help="load every configured reward, score a probe image")
    check.add_argument("job", help="job file, e.g. jobs/grpo.yaml")
    check.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a field, e.g. rewards.ocr.device=cpu")  # fmt: skip
    check.set_defaults(func=cmd_rewards_check)
    score = commands.add_parser("score", help="score a folder of images, write Parquet")
    score.add_argument("--reward", required=True, help=f"one of {rewards.names()}")
    score.add_argument(
        "--prompts", required=True, help="prompt file (one a line, or GenEval JSONL)"
    )
    score.add_argument("--images", required=True, help="folder of <prompt index>[_<k>].png images")
    score.add_argument("--kind", choices=PROMPT_KINDS,
                       help="prompt file kind (default: geneval for .jsonl, else text)")  # fmt: skip
    score.add_argument("--job", help="take rewards.<NAME> (options, device, batch size) from it")
    score.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                       help="a reward option, YAML value, e.g. checkpoint=/ckpt/HPS_v2.1.pt")  # fmt: skip
    score.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the config's")
    score.add_argument("--batch-size", type=int, help="images per scoring call")
    score.add_argument("--out", help="Parquet file (default: scores-<reward>.parquet)")
    score.set_defaults(func=cmd_rewards_score)


# ---- rewards check -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckRow:
    """One reward's line of the `rewards check` table."""

    reward: str
    backend: str
    checkpoint: str
    status: str
    seconds: float
    score: float | None = None
    message: str = ""


def configured_rewards(job: JobConfig) -> list[str]:
    """Rewards of `job.rewards`, then those only its GRPO stages name (trained on or evaluated
    with), each once."""
    return list(job.rewards) + [name for name in job.reward_names if name not in job.rewards]


def describe_backend(name: str, config: RewardConfig) -> str:
    """The model family behind a reward and the device it asks for."""
    options = config.options
    from rewards.clipscore import VARIANTS  # light: open_clip loads when a model is built

    variant = options.get("variant", "hessel")
    clip_default = VARIANTS[variant][0] if variant in VARIANTS else f"(unknown variant {variant!r})"
    backends = {
        "ocr": f"rapidocr PP-OCR (onnxruntime), engine {options.get('engine', 'shipped')}",
        "geneval": "mmdet Mask2Former" if options.get("detector") == "mmdet" else "yolov3-tiny",
        "pickscore": "transformers CLIP-H",
        "hpsv2": f"open_clip {options.get('model_name', 'ViT-H-14')}",
        "clipscore": f"open_clip {options.get('model_name', clip_default)}",
        "aesthetic": "transformers CLIP-L/14 + MLP",
        "imagereward": "BLIP",
    }
    return f"{backends.get(name, name)}, {config.device}"


def describe_checkpoint(config: RewardConfig) -> str:
    """The checkpoint options set, or `bundled` when the model ships with its package."""
    paths = [f"{key}={config.options[key]}" for key in CHECKPOINT_OPTIONS if key in config.options]
    return ", ".join(paths) or "bundled"


def probe_image() -> Image.Image:
    """A white image with the probe prompt's text, so OCR has something to read."""
    image = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(image).text((16, 16), "SOAR", fill="black", font=ImageFont.load_default(size=56))
    return image


def check_reward(name: str, config: RewardConfig) -> CheckRow:
    """Load reward `name` and score the probe image; any failure becomes the row's status."""
    row = {"reward": name, "backend": describe_backend(name, config),
           "checkpoint": describe_checkpoint(config)}  # fmt: skip
    start = time.perf_counter()
    try:
        reward = rewards.load(name, **reward_options(name, config))
        scorer = RewardScorer(name, config.model_copy(update={"on_bad_score": "error"}), reward)
        out = scorer.score([probe_image()], [PROBE_PROMPT], [PROBE_METADATA])
    except MissingCheckpointError as exc:
        return CheckRow(**row, status="missing checkpoint", seconds=_since(start), message=str(exc))
    except Exception as exc:  # reported in the table and the exit code, not swallowed
        message = f"{type(exc).__name__}: {exc}"
        return CheckRow(**row, status="error", seconds=_since(start), message=message)
    return CheckRow(**row, status="ok", seconds=_since(start), score=float(out.scores[0]))


def _since(start: float) -> float:
    return time.perf_counter() - start


def format_table(rows: list[CheckRow]) -> str:
    """The rows as an aligned text table."""
    header = ("reward", "backend", "checkpoint", "status", "time", "score")
    cells = [header] + [
        (
            r.reward,
            r.backend,
            r.checkpoint,
            r.status,
            f"{r.seconds:.2f} s",
            "-" if r.score is None else f"{r.score:.4f}",
        )  # fmt: skip
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_rewards_check(args: argparse.Namespace) -> int:
    """Load every configured reward and score a probe image; 1 if any reward fails."""
    job = load_job(args.job, args.overrides)
    names = configured_rewards(job)
    if not names:
        print(f"soar-ray rewards check: error: job {job.name!r} configures no reward "
              "(no `rewards:` entry and no grpo stage)", file=sys.stderr)  # fmt: skip
        return 2
    rows = [check_reward(name, job.rewards.get(name, RewardConfig())) for name in names]
    print(format_table(rows))
    failed = [row for row in rows if row.status != "ok"]
    for row in failed:
        print(f"soar-ray rewards check: {row.reward}: {row.message}", file=sys.stderr)
    if failed:
        print(f"soar-ray rewards check: {len(failed)} of {len(rows)} reward(s) failed",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


# ---- rewards score -----------------------------------------------------------------------------


def match_images(folder: Path, num_prompts: int) -> list[tuple[Path, int]]:
    """(image, prompt index) of every image in `folder` by the naming rule, sorted by index."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: {folder} is not a folder")
    pairs = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        match = IMAGE_NAME.match(path.stem)
        if match is None:
            raise ValueError(f"{path}: the name must start with its prompt index, e.g. 7.png or "
                             "7_0.png (see `soar-ray rewards score --help`)")  # fmt: skip
        index = int(match.group(1))
        if index >= num_prompts:
            raise ValueError(f"{path}: prompt index {index}, but the prompt file has "
                             f"{num_prompts} prompts (indices 0-{num_prompts - 1})")  # fmt: skip
        pairs.append((path, index))
    if not pairs:
        raise ValueError(f"--images: no {sorted(IMAGE_SUFFIXES)} files in {folder}")
    return sorted(pairs, key=lambda pair: (pair[1], pair[0].name))


def score_config(args: argparse.Namespace) -> RewardConfig:
    """rewards.<NAME> of --job (or the defaults), with --option, --device and --batch-size."""
    base = load_job(args.job).rewards.get(args.reward) if args.job else None
    fields = (base or RewardConfig()).model_dump()
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        fields["options"][key] = yaml.safe_load(value)
    if args.device is not None:
        fields["device"] = args.device
    if args.batch_size is not None:
        fields["batch_size"] = args.batch_size
    return RewardConfig.model_validate(fields)


def read_image(path: Path) -> Image.Image:
    """The image at `path` in RGB, fully decoded; a truncated or corrupt file is a ValueError
    naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except IMAGE_ERRORS as exc:
        raise ValueError(f"{path}: unreadable image ({exc})") from None


def score_folder(
    scorer: RewardScorer, pairs: list[tuple[Path, int]], prompts: list[Any]
) -> dict[str, Any]:
    """Parquet columns of the scored images, read and scored a batch at a time."""
    columns: dict[str, list[Any]] = {"image": [], "prompt_index": [], "prompt": [], "score": [],
                                     "dropped": []}  # fmt: skip
    components: dict[str, list[np.ndarray]] = {}
    batch_size = scorer.config.batch_size
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        images = [read_image(path) for path, _ in batch]
        chosen = [prompts[index] for _, index in batch]
        out = scorer.score(images, [p.text for p in chosen], [p.metadata or None for p in chosen])
        columns["image"] += [path.name for path, _ in batch]
        columns["prompt_index"] += [index for _, index in batch]
        columns["prompt"] += [p.text for p in chosen]
        columns["score"] += out.scores.tolist()
        columns["dropped"] += np.isin(np.arange(len(batch)), out.dropped).tolist()
        for key, values in out.components.items():
            components.setdefault(key, []).append(values)
    for key, parts in components.items():
        columns[key] = np.concatenate(parts).tolist()
    return columns


def cmd_rewards_score(args: argparse.Namespace) -> int:
    """Score the images of a folder against their prompts; write Parquet, print a summary."""
    try:
        config = score_config(args)
        kind = args.kind or ("geneval" if Path(args.prompts).suffix == ".jsonl" else "text")
        prompts = load_prompt_set(args.prompts, kind)
        pairs = match_images(Path(args.images), len(prompts))
        scorer = RewardScorer(args.reward, config)
        columns = score_folder(scorer, pairs, prompts)
    except USER_ERRORS as exc:
        print(f"soar-ray rewards score: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or f"scores-{args.reward}.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), out)
    print(summary(args.reward, columns, len(prompts), out))
    return 0


def summary(reward: str, columns: dict[str, Any], num_prompts: int, out: Path) -> str:
    """Counts, mean/std/min/max of the score, and the mean of every component."""
    scores = np.asarray(columns["score"], dtype=np.float64)
    kept = scores[~np.asarray(columns["dropped"], dtype=bool)]
    num_covered = len(set(columns["prompt_index"]))
    lines = [
        f"{reward}: {len(scores)} images of {num_covered}/{num_prompts} prompts -> {out}",
        f"  score  mean {kept.mean():.4f}  std {kept.std():.4f}  min {kept.min():.4f}  "
        f"max {kept.max():.4f}"
        if kept.size
        else "  score  every image was dropped",
    ]
    if kept.size < scores.size:
        lines.append(f"  dropped {scores.size - kept.size} image(s) (on_bad_score: drop)")
    fixed = {"image", "prompt_index", "prompt", "score", "dropped"}
    for key in [k for k in columns if k not in fixed]:
        lines.append(f"  {key}  mean {np.nanmean(np.asarray(columns[key], dtype=float)):.4f}")
    return "\n".join(lines)

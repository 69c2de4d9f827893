"""Scoring throughput (images/s) of the rewards that run without checkpoints: OCR and GenEval
with the yolov3-tiny backend.

    python benchmarks/bench_rewards.py                          # 512 px, batches of 8, CPU
    python benchmarks/bench_rewards.py --batch-size 16 --num-batches 5 --size 1024

The images alternate the shared stop-sign photo (an object and the word STOP) and a rendered
text banner, resized to --size; every prompt carries an OCR target and a GenEval row, so both
rewards do their full work. A few warm-up batches, then the median time of the timed ones.
Prints one markdown table row per reward, with the machine, date and versions.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import rewards

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STOP_IMAGE = SHARED_DATA / "images" / "giraffe_and_stop_sign.png"
PROMPT = 'a photo of a stop sign that reads "STOP"'
ROW = {"tag": "single_object", "include": [{"class": "stop sign", "count": 1}], "prompt": PROMPT}
VERSIONS = ("rapidocr", "onnxruntime", "opencv-python-headless", "numpy")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform's guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def make_images(num: int, size: int) -> list[np.ndarray]:
    """Alternating stop-sign photos (if the shared data is here) and rendered STOP banners."""
    banner = Image.new("RGB", (size, size), (235, 230, 220))
    font = ImageFont.load_default(size=size // 6)
    ImageDraw.Draw(banner).text((size // 8, size // 3), "STOP", fill=(20, 20, 20), font=font)
    kinds = [banner]
    if STOP_IMAGE.is_file():
        kinds.insert(0, Image.open(STOP_IMAGE).convert("RGB").resize((size, size)))
    return [np.asarray(kinds[i % len(kinds)]) for i in range(num)]


def throughput(reward: rewards.Reward, images: list[np.ndarray], args: argparse.Namespace) -> float:
    """Images per second: median over timed batches after warm-up."""
    prompts = [PROMPT] * len(images)
    metadata = [{**ROW, "target_text": "STOP"}] * len(images)
    seconds = []
    for step in range(args.num_warmup + args.num_batches):
        start = time.perf_counter()
        out = reward.score(images, prompts, metadata)
        if step >= args.num_warmup:
            seconds.append(time.perf_counter() - start)
    assert np.isfinite(out.scores).all()
    return len(images) / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", default=["ocr", "geneval"])
    parser.add_argument("--size", type=int, default=512, help="image side, pixels")
    parser.add_argument("--batch-size", type=int, default=8, help="images per score() call")
    parser.add_argument("--num-warmup", type=int, default=1)
    parser.add_argument("--num-batches", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    images = make_images(args.batch_size, args.size)
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in VERSIONS)
    date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    print("| reward | images/s | batch | size | machine | date | versions |")
    print("|---|---|---|---|---|---|---|")
    for name in args.rewards:
        reward = rewards.load(name, device=args.device, batch_size=args.batch_size)
        rate = throughput(reward, images, args)
        label = "geneval (yolov3-tiny)" if name == "geneval" else name
        cells = [label, f"{rate:.2f}", args.batch_size, f"{args.size} px", machine, date, versions]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()

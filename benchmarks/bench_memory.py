"""The largest SOAR batch one learner holds: the real learner step (`Learner.train`, built as
benchmarks/profile_soar_step.py builds it, on a latent cache of random tensors at the preset's
shapes) at growing batch sizes, two steps each (the second has the optimizer state), until one
runs out of device memory. Prints a markdown table (batch, peak GiB, step s) and writes
memory.json to --out.

    python benchmarks/bench_memory.py --preset sd35-medium --resolution 1024 --engine zero2 \\
        --batch-sizes 1,2,4,6,8 --out /tmp/mem-1024
    python benchmarks/bench_memory.py --preset tiny --precision fp32 --batch-sizes 1,2 --out /tmp/m

One rank: ZeRO stages partition optimizer state (1), gradients (2) and weights (3) over the ranks
of a group, so on N GPUs each holds less of those than this single-rank number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_soar_stage import device_name  # noqa: E402
from profile_soar_step import (  # noqa: E402
    DEVICE,
    add_step_arguments,
    make_job,
    one_learner,
    sync,
)

from soar_ray.build import build_dataset  # noqa: E402
from soar_ray.data import collate_samples  # noqa: E402


def probe(learner, *inputs, steps: int = 2) -> dict:
    """Peak device memory and the last step's seconds of `steps` train calls on `inputs`."""
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        learner.train(*inputs)
        sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    return {"peak_gib": peak, "step_s": time.perf_counter() - start}


def parse_search(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[int]]:
    """The arguments with --out (made) and --batch-sizes (ascending, each >= 1) added."""
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.batch_sizes.split(",")})
    if sizes[0] < 1:
        parser.error(f"--batch-sizes: sizes must be >= 1, got {args.batch_sizes}")
    args.out.mkdir(parents=True, exist_ok=True)
    return args, sizes


def search(learner, sizes: list[int], inputs) -> list[dict]:
    """probe() at each size (ascending) on `inputs(size)` until one runs out of device memory:
    one row a size, the last marked out_of_memory if one did."""
    rows = []
    for size in sizes:
        try:
            row = {"batch": size, **probe(learner, *inputs(size))}
        except torch.cuda.OutOfMemoryError:
            # The expected end of the search: every larger batch needs more. Recorded, not hidden.
            rows.append({"batch": size, "peak_gib": None, "step_s": None, "out_of_memory": True})
            print(f"batch {size}: out of memory", flush=True)
            break
        row["images_per_s"] = size / row["step_s"]
        rows.append(row)
        print(f"batch {size}: {row['peak_gib']:.1f} GiB, {row['step_s']:.3f} s", flush=True)
    return rows


def print_rows(rows: list[dict], batch: str, seconds: str) -> None:
    """search()'s rows as a markdown table, its first and third columns named as given."""
    print(f"| {batch} | peak GiB | {seconds} | images/s |\n|---|---|---|---|")
    for r in rows:
        if r.get("out_of_memory"):
            print(f"| {r['batch']} | out of memory | | |")
        else:
            print(f"| {r['batch']} | {r['peak_gib']:.1f} | {r['step_s']:.3f} | "
                  f"{r['images_per_s']:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,2,4,6,8,12,16")
    args, sizes = parse_search(parser)
    args.batch_size = sizes[-1]  # the cache holds the largest batch; smaller ones are its head
    job = make_job(args, args.out)
    dataset = build_dataset(job)
    samples = [dataset.get(i, 0) for i in range(sizes[-1])]
    learner = one_learner(job, args.engine)
    rows = search(learner, sizes, lambda size: (collate_samples(samples[:size]),))
    device = device_name()
    fits = [r["batch"] for r in rows if not r.get("out_of_memory")]
    result = {
        "date": str(datetime.date.today()), "device": device, "torch": torch.__version__,
        "preset": args.preset, "resolution": args.resolution, "text_tokens": 77 + args.t5_tokens,
        "aux_points": args.aux_points, "engine": args.engine, "precision": args.precision,
        "checkpointing": args.checkpointing, "compile": args.compile, "largest_batch": max(fits, default=0), "rows": rows,
    }  # fmt: skip
    (args.out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{device}, {args.preset} {args.resolution} px, {77 + args.t5_tokens} text tokens, "
          f"{args.aux_points} aux points, {args.engine}, checkpointing {args.checkpointing}")  # fmt: skip
    print_rows(rows, "batch", "step s")


if __name__ == "__main__":
    main()

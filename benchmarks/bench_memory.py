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
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_soar_step import (  # noqa: E402
    DEVICE,
    add_step_arguments,
    make_job,
    one_rank_group,
    sync,
)

from soar_ray.build import build_dataset, build_learner, build_sd3, learner_components  # noqa: E402
from soar_ray.data import collate_samples  # noqa: E402


def probe(learner, batch: dict, steps: int = 2) -> dict:
    """Peak device memory and the last step's seconds of `steps` train steps on `batch`."""
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        learner.train(batch)
        sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    return {"peak_gib": peak, "step_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,2,4,6,8,12,16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.batch_sizes.split(",")})
    if sizes[0] < 1:
        parser.error(f"--batch-sizes: sizes must be >= 1, got {args.batch_sizes}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.batch_size = sizes[-1]  # the cache holds the largest batch; smaller ones are its head
    job = make_job(args, args.out)
    dataset = build_dataset(job)
    samples = [dataset.get(i, 0) for i in range(sizes[-1])]
    if args.engine != "local":
        one_rank_group()
    model = build_sd3(job, DEVICE, components=learner_components(job))
    learner = build_learner(job, model, distributed=args.engine != "local")
    learner.setup_stage(0)
    rows = []
    for size in sizes:
        try:
            row = {"batch": size, **probe(learner, collate_samples(samples[:size]))}
        except torch.cuda.OutOfMemoryError:
            # The expected end of the search: every larger batch needs more. Recorded, not hidden.
            rows.append({"batch": size, "peak_gib": None, "step_s": None, "out_of_memory": True})
            print(f"batch {size}: out of memory", flush=True)
            break
        row["images_per_s"] = size / row["step_s"]
        rows.append(row)
        print(f"batch {size}: {row['peak_gib']:.1f} GiB, {row['step_s']:.3f} s", flush=True)
    device = torch.cuda.get_device_name(0) if DEVICE == "cuda" else f"CPU ({os.cpu_count()} cores)"
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
    print("| batch | peak GiB | step s | images/s |\n|---|---|---|---|")
    for r in rows:
        if r.get("out_of_memory"):
            print(f"| {r['batch']} | out of memory | | |")
        else:
            print(f"| {r['batch']} | {r['peak_gib']:.1f} | {r['step_s']:.3f} | "
                  f"{r['images_per_s']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()

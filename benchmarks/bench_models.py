"""Parameter counts of every model preset and one preset's transformer forward+backward time.

    python benchmarks/bench_models.py                      # tiny on this CPU
    python benchmarks/bench_models.py --preset sd35-medium --device cuda --dtype bfloat16 \
        --resolution 512 --out benchmarks/results/models_sd35m_h100.md

Counts are taken on the meta device (no memory). The timing runs the transformer alone on random
inputs of SD3's shapes (text encoders are not needed): batch B at the given resolution, a few
warm-up iterations, then the median of the timed ones.
"""

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from soar_ray.models import COMPONENTS, PRESETS, build_transformer, count_parameters, get_preset
from soar_ray.models.tokenizers import CLIP_MAX_LENGTH

COMPONENT_TITLES = {
    "text_encoder": "CLIP-L",
    "text_encoder_2": "CLIP-G",
    "text_encoder_3": "T5",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _human(count: int) -> str:
    """1234567 -> '1.23 M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)


def machine_lines(device: torch.device) -> list[str]:
    """CPU model, cores, accelerator, torch version and date, as markdown bullet lines."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} cores (torch threads: {torch.get_num_threads()})",
        f"- torch {torch.__version__}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]
    if device.type == "cuda":
        lines.insert(1, f"- GPU: {torch.cuda.get_device_name(device)}")
    return lines


def parameter_table() -> list[str]:
    """Markdown table: one row per preset, one column per component."""
    keys = [*COMPONENTS, "total"]
    titles = ["preset", *(COMPONENT_TITLES.get(k, k) for k in keys)]
    rows = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for name in PRESETS:
        counts = count_parameters(name)
        rows.append("| " + " | ".join([name, *(_human(counts[k]) for k in keys)]) + " |")
    return rows


def time_train_step(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median seconds of one transformer forward+backward on random SD3-shaped inputs."""
    preset = get_preset(args.preset)
    config = preset.transformer
    transformer = build_transformer(preset, device=device, dtype=DTYPES[args.dtype])
    transformer.train()
    gen = torch.Generator().manual_seed(0)
    side = args.resolution // 8  # SD3 VAE scale factor
    num_text_tokens = CLIP_MAX_LENGTH + preset.max_sequence_length

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, DTYPES[args.dtype])

    x_BCHW = draw(args.batch_size, config["in_channels"], side, side)
    prompt_BLD = draw(args.batch_size, num_text_tokens, config["joint_attention_dim"])
    pooled_BP = draw(args.batch_size, config["pooled_projection_dim"])
    timestep_B = torch.rand(args.batch_size, generator=gen).to(device) * 1000
    seconds = []
    for step in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # host-device sync: time whole steps only
        start = time.perf_counter()
        v_BCHW = transformer(
            hidden_states=x_BCHW,
            encoder_hidden_states=prompt_BLD,
            pooled_projections=pooled_BP,
            timestep=timestep_B,
            return_dict=False,
        )[0]
        v_BCHW.float().square().mean().backward()
        transformer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"median_s": median, "min_s": min(seconds), "images_per_s": args.batch_size / median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: preset's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    args.resolution = args.resolution or get_preset(args.preset).resolution
    if args.resolution % 16:
        parser.error("--resolution must be a multiple of 16 (VAE factor 8 x patch 2)")
    device = torch.device(args.device)

    timing = time_train_step(args, device)
    lines = ["# Model benchmarks", "", *machine_lines(device), "", "## Parameters", ""]
    lines += [*parameter_table(), "", "## Transformer forward + backward", ""]
    lines += [
        "| preset | device | dtype | batch | resolution | median ms | min ms | images/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {args.preset} | {args.device} | {args.dtype} | {args.batch_size} | {args.resolution} "
        f"| {1e3 * timing['median_s']:.1f} | {1e3 * timing['min_s']:.1f} "
        f"| {timing['images_per_s']:.2f} |",
        "",
        f"{args.warmup} warm-up and {args.iters} timed iterations; loss = mean(v^2); no optimizer.",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()

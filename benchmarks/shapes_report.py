"""Plots and tables of the shapes study (`benchmarks/shapes_geneval.py --phases report`): the
held-out GenEval score against post-training step per method (mean +- std over seeds and split
seeds, the base as a line), per-tag bars of the final scores, the GRPO reward curves, and a
Markdown table (held-out and seen) for benchmarks/RESULTS.md. Needs matplotlib
(`pip install matplotlib`)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def method_of(run: str) -> str:
    return re.sub(r"-seed\d+$", "", run)


def gather(results: dict[str, Any]) -> dict[str, list[dict]]:
    """Method -> its runs over every split seed and seed."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for split in results["splits"].values():
        for run, data in split.get("methods", {}).items():
            runs[method_of(run)].append(data)
    return runs


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several with the same profile and different split seeds (e.g. one
    device call per split)."""
    merged = {"profile": parts[0]["profile"], "splits": {}}
    for part in parts:
        if part["profile"] != merged["profile"]:
            raise SystemExit("--merge: the results were made with different profiles")
        twice = set(part["splits"]) & set(merged["splits"])
        if twice:
            raise SystemExit(f"--merge: split seed(s) {sorted(twice)} appear in two results")
        merged["splits"].update(part["splits"])
    return merged


def train_seconds(results: dict[str, Any], method: str) -> str:
    """Mean training wall time of a method's runs (runs in parallel share the machine, so this
    compares methods measured side by side, not against a machine to themselves)."""
    values = [s for split in results["splits"].values()
              for run, s in split.get("seconds", {}).items() if method_of(run) == method]  # fmt: skip
    return f"{np.mean(values):.0f}" if values else "-"


def final_stats(runs: list[dict], key: str, metric: str = "overall") -> tuple[float, float]:
    values = [run["final"][key][metric] for run in runs if key in run["final"]]
    return float(np.mean(values)), float(np.std(values))


def markdown_table(results: dict[str, Any]) -> str:
    """Final scores per method: held-out and seen at each step count, Frechet distance."""
    runs = gather(results)
    steps = results["profile"]["eval_steps"]
    keys = [f"{name}_{s}" for s in steps for name in ("held_out", "seen")]
    header = (
        "| method | runs | train s | "
        + " | ".join(k.replace("_", " ") for k in keys)
        + " | FD held out |"
    )
    lines = [header, "|" + "---|" * (len(keys) + 4)]
    base = [split["base"] for split in results["splits"].values() if "base" in split]
    for method, data in [("base", base), *runs.items()]:
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (final_stats(data, k) for k in keys)]
        fd_mean, fd_std = final_stats(data, f"held_out_{steps[0]}", "fd")
        lines.append(f"| {method} | {len(data)} | {train_seconds(results, method)} | " +
                     " | ".join(cells) +
                     f" | {fd_mean:.3f} ± {fd_std:.3f} |")  # fmt: skip
    for split_seed, split in results["splits"].items():
        for start, grpo in split.get("grpo", {}).items():
            cells = [f"{grpo['final'][k]['overall']:.3f}" for k in keys]
            fd = grpo["final"][f"held_out_{steps[0]}"]["fd"]
            seconds = split.get("seconds", {}).get(f"grpo-from-{start}", float("nan"))
            lines.append(f"| GRPO from {start} (split {split_seed}) | 1 | {seconds:.0f} | " +
                         " | ".join(cells) +
                         f" | {fd:.3f} |")  # fmt: skip
    return "\n".join(lines)


def timing_table(results: dict[str, Any]) -> str:
    """Where the runs' wall time went (each run's `timings`, from its launch): median and
    largest over the runs, per phase; evaluations and Frechet distances summed over a run."""
    phases: dict[str, list[float]] = defaultdict(list)
    for split in results["splits"].values():
        runs = [
            split.get("base"),
            *split.get("methods", {}).values(),
            *split.get("grpo", {}).values(),
        ]
        for run in filter(None, runs):
            timings = run.get("timings") or []
            totals: dict[str, float] = defaultdict(float)
            for what, start, took in timings:
                totals[what.split()[0]] += took
                if what == "training":
                    phases["launch to training"].append(start)
            for phase, label in (("evaluation", "evaluation session start"),
                                 ("training", "training"), ("eval", "evaluations (sum)"),
                                 ("fd", "Frechet distances (sum)")):  # fmt: skip
                if phase in totals:
                    phases[label].append(totals[phase])
            if timings:
                phases["launch to last evaluation"].append(max(s + t for _, s, t in timings))
    lines = ["| phase of a run | runs | median s | largest s |", "|---|---|---|---|"]
    lines += [f"| {label} | {len(values)} | {np.median(values):.1f} | {max(values):.1f} |"
              for label, values in phases.items()]  # fmt: skip
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"the report needs matplotlib: pip install matplotlib ({exc})") from None
    runs = gather(results)
    paths = []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    key = f"held_out_{results['profile']['eval_steps'][0]}"
    base = [split["base"]["final"][key]["overall"] for split in results["splits"].values()
            if "base" in split]  # fmt: skip
    if base:
        axis.axhline(np.mean(base), color="black", linestyle="--", label="base")
    for method, data in sorted(runs.items()):
        steps = [p["step"] for p in data[0]["curve"]]
        values = np.array([[p["held_out"]["overall"] for p in run["curve"]] for run in data])
        mean, std = values.mean(0), values.std(0)
        axis.plot(steps, mean, marker="o", label=method)
        axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
    axis.set_title("held-out compositions")
    axis.set_xlabel("post-training step (sft-compute: SOAR's compute per step)")
    axis.set_ylabel("GenEval overall (shapes_geneval, EMA weights)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    paths.append(out / "score_vs_step.png")
    figure.tight_layout()
    figure.savefig(paths[-1], dpi=120)

    tags = sorted({t for data in runs.values() for r in data for t in r["final"][key]["per_tag"]})
    figure, axis = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(1, len(runs))
    for k, (method, data) in enumerate(sorted(runs.items())):
        values = [np.mean([r["final"][key]["per_tag"].get(t, np.nan) for r in data]) for t in tags]
        axis.bar(np.arange(len(tags)) + k * width, values, width, label=method)
    axis.set_xticks(np.arange(len(tags)) + 0.4 - width / 2, tags)
    axis.set_ylabel("strict accuracy, held-out")
    axis.legend(fontsize=8)
    paths.append(out / "per_tag.png")
    figure.tight_layout()
    figure.savefig(paths[-1], dpi=120)

    figure, axis = plt.subplots(figsize=(6, 4))
    for split_seed, split in results["splits"].items():
        for start, grpo in split.get("grpo", {}).items():
            steps, rewards = zip(*grpo["reward"])
            axis.plot(steps, rewards, label=f"from {start} (split {split_seed})")
    axis.set_xlabel("GRPO epoch")
    axis.set_ylabel("shapes_geneval reward (training prompts)")
    axis.legend(fontsize=8)
    paths.append(out / "grpo_reward.png")
    figure.tight_layout()
    figure.savefig(paths[-1], dpi=120)
    table = markdown_table(results) + "\n\nWhere the runs' time went:\n\n" + timing_table(results)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return paths

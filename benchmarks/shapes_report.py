"""Plots and tables of the shapes study (`benchmarks/shapes_geneval.py --phases report`), each
split seed on its own (its seeds share its world and base; pooling splits would measure the gap
between them): the held-out GenEval score against post-training step per method (mean +- std over
seeds, the base as a line), per-tag bars of the final scores, the GRPO reward curves with each
GRPO checkpoint's held-out score, and Markdown tables for benchmarks/RESULTS.md (final scores per
split, each method's difference from SFT, where the runs' time went). Needs matplotlib
(`pip install matplotlib`)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def method_of(run: str) -> str:
    return re.sub(r"-seed\d+$", "", run)


def gather(split: dict[str, Any]) -> dict[str, list[dict]]:
    """Method -> its runs (one per seed) in one split seed."""
    runs: dict[str, list[dict]] = defaultdict(list)
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


def final_values(runs: list[dict], key: str, metric: str = "overall") -> np.ndarray:
    return np.array([run["final"][key][metric] for run in runs if key in run["final"]])


def split_table(split: dict[str, Any], keys: list[str]) -> str:
    """One split seed's final scores: mean +- std (ddof 0) over the seeds of each method, the
    base and each GRPO run as one value, Frechet distance on the first held-out key; training
    wall time is the mean over the method's runs, which shared the machine side by side."""
    lines = ["| method | runs | train s | " + " | ".join(k.replace("_", " ") for k in keys)
             + " | FD held out |", "|" + "---|" * (len(keys) + 4)]  # fmt: skip
    named = {"base": split["base"]} if "base" in split else {}
    named |= split.get("methods", {})
    named |= {f"grpo-from-{start}": grpo for start, grpo in split.get("grpo", {}).items()}
    rows: dict[str, list[str]] = defaultdict(list)  # row -> its runs' names
    for run in named:
        rows[method_of(run).replace("grpo-from-", "GRPO from ")].append(run)
    seconds = split.get("seconds", {})
    for name, members in rows.items():
        runs, times = [named[m] for m in members], [seconds[m] for m in members if m in seconds]
        cells = []
        for key, metric in [*((k, "overall") for k in keys), (keys[0], "fd")]:
            values = final_values(runs, key, metric)
            cells.append(
                f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(runs) > 1 else "")
            )
        seconds_cell = f"{np.mean(times):.0f}" if times else "-"
        lines.append(f"| {name} | {len(runs)} | {seconds_cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_table(results: dict[str, Any], keys: list[str], against: str = "sft") -> str:
    """Each method's mean minus `against`'s mean, per split seed (the seeds of a split share its
    world and base, so differences are read within a split, never pooled across splits)."""
    splits = results["splits"]
    lines = ["| method | " + " | ".join(f"{k.replace('_', ' ')}, split {seed}" for k in keys
                                     for seed in splits) + " |",
             "|" + "---|" * (1 + len(keys) * len(splits))]  # fmt: skip
    grouped = [gather(split) for split in splits.values()]
    for method in sorted({m for runs in grouped for m in runs} - {against}):
        cells = []
        for key in keys:
            for runs in grouped:
                if method in runs and against in runs:
                    diff = final_values(runs[method], key).mean() - final_values(
                        runs[against], key).mean()  # fmt: skip
                    cells.append(f"{diff:+.3f}")
                else:
                    cells.append("-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(results: dict[str, Any]) -> str:
    """Final scores per split seed (held-out and seen at each step count, Frechet distance),
    then each method's difference from SFT per split."""
    steps = results["profile"]["eval_steps"]
    keys = [f"{name}_{s}" for s in steps for name in ("held_out", "seen")]
    sections = [f"Split {seed}:\n\n" + split_table(split, keys)
                for seed, split in results["splits"].items()]  # fmt: skip
    sections.append("Difference from SFT (method mean minus SFT mean, within each split):\n\n"
                    + difference_table(results, keys))  # fmt: skip
    return "\n\n".join(sections)


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
    splits = results["splits"]
    key = f"held_out_{results['profile']['eval_steps'][0]}"
    paths = []

    def panels(width: float, height: float, count: int):
        figure, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
        return figure, axes[0]

    def save(figure, name: str) -> None:
        paths.append(out / name)
        figure.tight_layout()
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)

    figure, axes = panels(6, 4.5, len(splits))
    for axis, (seed, split) in zip(axes, splits.items()):
        if "base" in split:
            axis.axhline(split["base"]["final"][key]["overall"], color="black", linestyle="--",
                         label="base")  # fmt: skip
        for method, runs in sorted(gather(split).items()):
            steps = [p["step"] for p in runs[0]["curve"]]
            values = np.array([[p["held_out"]["overall"] for p in run["curve"]] for run in runs])
            mean, std = values.mean(0), values.std(0)
            axis.plot(steps, mean, marker="o", label=f"{method} ({len(runs)} seeds)")
            axis.fill_between(steps, mean - std, mean + std, alpha=0.15)
        axis.set_title(f"held-out compositions, split {seed}")
        axis.set_xlabel("post-training step (sft-compute: SOAR's compute per step)")
        axis.set_ylabel("GenEval overall (shapes_geneval, EMA weights)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save(figure, "score_vs_step.png")

    figure, axes = panels(8, 3.5, len(splits))
    for axis, (seed, split) in zip(axes, splits.items()):
        runs = gather(split)
        tags = sorted({t for data in runs.values() for r in data
                       for t in r["final"][key]["per_tag"]})  # fmt: skip
        width = 0.8 / max(1, len(runs))
        for k, (method, data) in enumerate(sorted(runs.items())):
            values = [np.mean([r["final"][key]["per_tag"].get(t, np.nan) for r in data])
                      for t in tags]  # fmt: skip
            axis.bar(np.arange(len(tags)) + k * width, values, width, label=method)
        axis.set_xticks(np.arange(len(tags)) + 0.4 - width / 2, tags, fontsize=7)
        axis.set_title(f"split {seed}")
        axis.set_ylabel("strict accuracy, held-out")
        axis.legend(fontsize=7)
    save(figure, "per_tag.png")

    figure, (reward_axis, score_axis) = panels(6, 4, 2)
    window, first_seed = 10, results["profile"]["seeds"][0]
    for seed, split in splits.items():
        for start, grpo in split.get("grpo", {}).items():
            epochs, rewards = map(np.array, zip(*grpo["reward"]))
            label = f"from {start} (split {seed})"
            smoothed = len(rewards) >= window
            (line,) = reward_axis.plot(
                epochs, rewards, alpha=0.25, label=None if smoothed else label
            )
            if smoothed:
                smooth = np.convolve(rewards, np.ones(window) / window, mode="valid")
                reward_axis.plot(epochs[window - 1 :], smooth, color=line.get_color(), label=label)
            # GRPO starts from the first seed's run of its method: that run's score is epoch 0.
            origin = split["methods"][f"{start}-seed{first_seed}"]["final"][key]["overall"]
            score_axis.plot([0] + [p["step"] for p in grpo["curve"]],
                            [origin] + [p["held_out"]["overall"] for p in grpo["curve"]],
                            marker="o", color=line.get_color())  # fmt: skip
    reward_axis.set_xlabel("GRPO epoch")
    reward_axis.set_ylabel("shapes_geneval reward, training prompts")
    reward_axis.set_title(f"faint: per epoch; solid: {window}-epoch mean", fontsize=9)
    reward_axis.legend(fontsize=7)
    score_axis.set_xlabel("GRPO epoch (0: the run it starts from)")
    score_axis.set_ylabel("GenEval overall, held-out")
    score_axis.set_title("held-out score (colours as on the left)", fontsize=9)
    score_axis.grid(alpha=0.3)
    save(figure, "grpo_reward.png")
    table = markdown_table(results) + "\n\nWhere the runs' time went:\n\n" + timing_table(results)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return paths

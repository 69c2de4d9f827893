"""The shapes study's pipeline (benchmarks/shapes_geneval.py, its `test` profile) on a real local
Ray: world, autoencoder, latent cache, base, SFT / SOAR / SFT-at-SOAR-compute, GRPO from two of
them, each run a driver process of its own (three at a time) evaluating its checkpoints,
results.json and the table. The pipeline, not the outcome: a tiny model trained for two steps
scores what it scores."""

import json
import sys
from pathlib import Path

import pytest
import ray
import yaml

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_the_study_runs_every_phase_and_reports(ray_local, tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from shapes_geneval import CPU_ACTORS, PROFILES, run_protocol, share, soar_compute_ratio
    from shapes_report import markdown_table, merge_results, timing_table

    profile = PROFILES["test"]
    results = run_protocol(tmp_path, "test", profile, parallel=3)
    assert results == json.loads((tmp_path / "results.json").read_text())
    split = results["splits"]["0"]
    assert set(split) == {"autoencoder", "seconds", "base", "methods", "grpo"}
    assert set(split["methods"]) == {"sft-seed0", "soar-cfg4.5-seed0", "sft-compute-seed0"}
    assert set(split["grpo"]) == {"soar-cfg4.5", "sft"}
    assert set(split["seconds"]) == {"base", *split["methods"], "grpo-from-soar-cfg4.5",
                                     "grpo-from-sft"}  # fmt: skip
    root = tmp_path / "split-0"
    # SFT at SOAR's compute trains the same steps on a ratio x larger batch; every run starts
    # from the base output.
    compute = [json.loads(line) for line in (root / "sft-compute-seed0" / "metrics.jsonl")
               .read_text().splitlines()]  # fmt: skip
    assert len(compute) == profile.posttrain_steps
    job = (root / "sft-compute-seed0" / "job.yaml").read_text()
    assert f"batch_size: {round(profile.batch_size * soar_compute_ratio(profile))}" in job
    assert f"transformer: {root / 'base' / 'train' / 'transformer'}" in (
        root / "sft-seed0" / "job.yaml").read_text()  # fmt: skip
    # Every actor asks for a share that lets the 3 runs in parallel hold all of theirs at once.
    cpus = ray.cluster_resources()["CPU"]
    cluster = yaml.safe_load((root / "grpo-from-sft" / "job.yaml").read_text())["cluster"]
    assert cluster["cpus_per_learner"] == cluster["cpus_per_rollout_worker"] == share(
        3, cpus, CPU_ACTORS) == cluster["reward_actors"]["shapes_geneval"]["num_cpus"]  # fmt: skip
    soar = [json.loads(line) for line in (root / "soar-cfg4.5-seed0" / "metrics.jsonl")
            .read_text().splitlines()]  # fmt: skip
    assert soar[0]["aux_points_per_sample"] > 0 and compute[0]["aux_points_per_sample"] == 0
    for run in [*split["methods"].values(), *split["grpo"].values()]:
        assert run["curve"] and {"seen_2", "held_out_2"} == set(run["final"])
        for value in run["final"].values():
            assert 0 <= value["overall"] <= 1 and value["fd"] >= 0
    assert len(split["grpo"]["sft"]["reward"]) == profile.grpo_epochs
    # The output is the last checkpoint's weights: its evaluation (gallery and all) serves both.
    sft = split["methods"]["sft-seed0"]
    assert sft["curve"][-1]["step"] == profile.posttrain_steps
    assert sft["curve"][-1]["held_out"] == sft["final"]["held_out_2"]
    # The curve is on held-out prompts; the seen ones are evaluated at the last checkpoint only.
    assert [set(p) for p in sft["curve"]] == [{"step", "held_out"}] * (len(sft["curve"]) - 1) + [
        {"step", "held_out", "seen"}
    ]
    assert sft["curve"][-1]["seen"] == sft["final"]["seen_2"]
    assert (root / "sft-seed0" / "eval" / "step-00-0000002-held_out-2" / "index.html").is_file()
    # Where a run's wall time went: its training and each evaluation, after its launch.
    phases = {what.split()[0] for what, _, _ in sft["timings"]}
    assert {"evaluation", "training", "eval", "fd"} == phases
    assert all(start >= 0 and took >= 0 for _, start, took in sft["timings"])
    timing = timing_table(results)  # every run of the split: the base, 3 methods, 2 GRPO
    assert "| training | 6 |" in timing and "| launch to last evaluation | 6 |" in timing
    table = markdown_table(results)
    assert (
        "Split 0:" in table and "| soar-cfg4.5 | 1 |" in table and "| GRPO from sft | 1 |" in table
    )
    # One device call per split: their results merge into one report; a split twice is refused.
    other = {**results, "splits": {"1": split}}
    merged = merge_results([results, other])
    assert merged["splits"] == {"0": split, "1": split}
    assert "Split 1:" in markdown_table(merged)
    with pytest.raises(SystemExit, match=r"split seed\(s\) \['0'\] appear in two results"):
        merge_results([results, results])


def test_shares_let_every_run_in_parallel_hold_its_actors_at_once():
    sys.path.insert(0, str(BENCHMARKS))
    from shapes_geneval import CPU_ACTORS, GPU_ACTORS, share

    assert (GPU_ACTORS, CPU_ACTORS) == (3, 5)
    # 8 runs on one GPU: 1/24 = 0.041666..., cut to Ray's 1e-4 units; 24 actors fit in 0.9984.
    assert share(8, 1, GPU_ACTORS) == 0.0416 and 24 * share(8, 1, GPU_ACTORS) <= 1
    assert share(8, 16, CPU_ACTORS) == 0.4  # 16 CPUs / 40 actors
    assert share(4, 2, GPU_ACTORS) == 0.1666  # 2 / 12
    assert share(3, 2, CPU_ACTORS) == 0.1333  # the suite's Ray: 2 CPUs, 3 runs


def report_results() -> dict:
    """Two split seeds of hand-set final scores, 2-point held-out curves and a 12-epoch GRPO run
    from SFT's first seed."""

    def run(score: float) -> dict:
        final = {key: {"overall": score, "fd": 0.5, "per_tag": {"counting": score}}
                 for key in ("held_out_40", "seen_40")}  # fmt: skip
        curve = [{"step": 1, "held_out": {"overall": score / 2}},
                 {"step": 2, "held_out": final["held_out_40"]}]  # fmt: skip
        return {"final": final, "curve": curve}

    def split(sft: list[float], soar: list[float]) -> dict:
        methods = {f"sft-seed{k}": run(v) for k, v in enumerate(sft)}
        methods |= {f"soar-cfg2-seed{k}": run(v) for k, v in enumerate(soar)}
        seconds = {"base": 10.0, "sft-seed0": 4.0, "sft-seed1": 6.0, "grpo-from-sft": 7.0}
        grpo = run(0.9) | {"reward": [[epoch, 0.4 + epoch / 100] for epoch in range(1, 13)]}
        return {"base": run(0.1), "methods": methods, "grpo": {"sft": grpo}, "seconds": seconds}

    return {
        "profile": {"eval_steps": [40], "seeds": [0, 1]},
        "splits": {"0": split([0.2, 0.4], [0.5, 0.5]), "1": split([0.6, 0.6], [0.5, 0.7])},
    }


def test_the_report_compares_methods_within_each_split():
    sys.path.insert(0, str(BENCHMARKS))
    from shapes_report import markdown_table

    table = markdown_table(report_results())
    # Split 0: SFT's two seeds 0.2 and 0.4 -> 0.300 ± 0.100 (ddof 0), trained 4 s and 6 s -> 5.
    assert "| sft | 2 | 5 | 0.300 ± 0.100 | 0.300 ± 0.100 | 0.500 ± 0.000 |" in table
    assert "| base | 1 | 10 | 0.100 | 0.100 | 0.500 |" in table
    assert "| GRPO from sft | 1 | 7 | 0.900 | 0.900 | 0.500 |" in table
    assert "| soar-cfg2 | 2 | - | 0.600 ± 0.100 | 0.600 ± 0.100 | 0.500 ± 0.000 |" in table
    # The difference is read within each split: 0.5 - 0.3 and 0.6 - 0.6.
    assert "| soar-cfg2 | +0.200 | +0.000 | +0.200 | +0.000 |" in table


def test_the_report_draws_its_plots_and_writes_its_table(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from shapes_report import markdown_table, write_report

    results = report_results()
    paths = write_report(results, tmp_path)
    assert [p.name for p in paths] == ["score_vs_step.png", "per_tag.png", "grpo_reward.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    table = (tmp_path / "table.md").read_text()
    assert table.startswith(markdown_table(results)) and "Where the runs' time went:" in table

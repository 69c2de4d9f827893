"""`soar-ray run` from the command line: a short real run, and bad input stopped before any actor."""

import json
import re

import pytest
import ray

from soar_ray.cli import main

FAST = ["--set", "data.synthetic.num_images=16", "--set", "logging.tensorboard=false"]


@pytest.mark.slow
def test_run_writes_config_metrics_and_output(ray_local, tmp_path, capsys):
    run_dir = tmp_path / "run"
    debris = run_dir / "checkpoints" / ".staging-step-00-0000002-0badf00d"
    debris.mkdir(parents=True)  # an earlier run's unfinished checkpoint: removed at start
    code = main(["run", "jobs/tiny.yaml", "--set", f"output_dir={run_dir}",
                 "--set", "stages.0.num_steps=3", "--set", "logging.sample_every=0", *FAST])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"stage 0-soar -> {run_dir / '0-soar' / 'transformer'}" in out
    assert f"removed {debris}, a checkpoint an earlier run did not finish writing" in out
    assert not debris.exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "stages:" in (run_dir / "config.yaml").read_text()


def _error(capsys, *args, job="jobs/tiny.yaml"):
    code = main(["run", job, *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err


def test_bad_value_names_the_dotted_field(capsys):
    assert "stages.0.lambda_aux" in _error(capsys, "--set", "stages.0.lambda_aux=-1")


def test_unknown_key_is_named_with_a_suggestion(capsys):
    err = _error(capsys, "--set", "stages.0.lamda_aux=0")
    assert "stages.0.lamda_aux" in err and "lambda_aux" in err


def test_missing_data_folder_is_named(capsys, tmp_path):
    err = _error(capsys, "--set", "data.source=jsonl", "--set", f"data.jsonl={tmp_path}/a.jsonl",
                 "--set", f"data.image_dir={tmp_path}/images")  # fmt: skip
    assert "data.jsonl" in err and "data.image_dir" in err


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["stages.0.rewards={jpeg_compresibility: 1.0}"],
         "stages.0.rewards.jpeg_compresibility: unknown reward 'jpeg_compresibility'"),
        (["stages.0.rewards={pickscore: 1.0}"],
         "stages.0.rewards.pickscore: 'pickscore' is not configured; add rewards.pickscore.options"),
        (["stages.0.num_updates_per_epoch=8"],
         "stages.0.group_size: 4 images per prompt is larger than the batch of one update"),
        (["data.prompts.path=jobs/prompts/none.txt"],
         "data.prompts.path: file not found: "),
    ],
)  # fmt: skip
def test_bad_grpo_input_stops_before_any_work(tmp_path, capsys, overrides, expected):
    run_dir = tmp_path / "r"
    sets = [arg for o in overrides for arg in ("--set", o)]
    err = _error(capsys, "--set", f"output_dir={run_dir}", *sets, job="jobs/tiny_grpo.yaml")
    assert expected in err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("# only a comment\n\n", "no prompts in the file"),
     ("a cat\nbad \x01 line\n", ":2: control character")],
)  # fmt: skip
def test_empty_or_bad_prompt_file_stops_before_any_actor(tmp_path, capsys, text, expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    err = _error(capsys, "--set", f"output_dir={tmp_path / 'r'}", "--set",
                 f"data.prompts.path={prompts}", job="jobs/tiny_grpo.yaml")  # fmt: skip
    assert f"data.prompts: {prompts}" in err and expected in err
    assert not (tmp_path / "r").exists()  # stopped before the run folder, Ray and any actor


def test_resume_inside_a_stage_without_the_previous_output_stops_before_any_actor(tmp_path, capsys):
    run_dir = tmp_path / "r"
    folder = run_dir / "checkpoints" / "step-01-0000002"  # a complete checkpoint inside GRPO
    folder.mkdir(parents=True)
    state = {"stage_index": 1, "stage_name": "grpo", "step": 2, "policy_version": 42}
    (folder / "state.json").write_text(json.dumps(state))
    err = _error(capsys, "--set", f"output_dir={run_dir}", job="jobs/tiny_soar_grpo.yaml")
    assert f"{run_dir / 'soar' / 'transformer'}: resuming {folder} inside stage 'grpo'" in err
    assert "checkpoint.resume: never" in err


@pytest.mark.slow
def test_topology_larger_than_the_cluster_fails_before_any_actor(ray_local, tmp_path, capsys):
    err = _error(capsys, "--set", f"output_dir={tmp_path}", "--set", "cluster.num_learners=64",
                 *FAST)  # fmt: skip
    assert "cluster.num_learners" in err and "CPU" in err
    assert not [a for a in ray.util.list_named_actors() if a.startswith(("learner-", "rollout-"))]


@pytest.mark.slow
def test_prepare_writes_a_cache_that_training_reads(ray_local, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["--set", f"output_dir={tmp_path / 'run'}", *FAST]
    assert main(["prepare", "jobs/tiny.yaml", "--out", str(cache), *common]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["num_rows"] == 16
    code = main(["run", "jobs/tiny.yaml", *common, "--set", "data.source=cache",
                 "--set", f"data.cache_dir={cache}", "--set", "stages.0.num_steps=2",
                 "--set", "logging.sample_every=2", "--set", "logging.num_sample_steps=2"])  # fmt: skip
    assert code == 0
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and (tmp_path / "run" / "samples" / "0-soar-step-000002.png").is_file()


@pytest.mark.slow
def test_a_diverged_step_stops_the_run_before_its_state_is_saved(ray_local, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", "jobs/tiny.yaml", "--set", f"output_dir={run_dir}",
                 "--set", "stages.0.optimizer.lr=1.0e+12", "--set", "stages.0.num_steps=6",
                 "--set", "checkpoint.every=1", "--set", "checkpoint.keep_last=1",
                 "--set", "logging.sample_every=0", *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    step = int(re.search(r"stage 0-soar step (\d+): ", err).group(1))
    assert "the run stops without saving this state" in err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step and None in (rows[-1]["loss"], rows[-1]["grad_norm"])
    # Every checkpoint holds a finite state: the newest is the step before the bad one.
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert kept == ([f"step-00-{step - 1:07d}"] if step > 1 else [])
    assert not (run_dir / "0-soar" / "transformer").exists()

"""`soar-ray run` from the command line: a short real run, and bad input stopped before any actor."""

import json
import re

import pytest
import ray
import torch
from safetensors.torch import load_file

from soar_ray.cli import main
from soar_ray.config import dump_config, load_job

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
    job = load_job("jobs/tiny_soar_grpo.yaml", [f"output_dir={run_dir}"])
    (folder / "config.yaml").write_text(dump_config(job))
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


def test_a_job_file_that_is_not_utf8_is_one_line_naming_the_byte(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_bytes(b"seed: 1\nname: caf\xe9\n")  # Latin-1, not UTF-8
    err = _error(capsys, job=str(job))
    assert err == (f"soar-ray: error: {job}: not UTF-8: byte offset 17 (line 2): invalid "
                   "continuation byte; save the job file as UTF-8\n")  # fmt: skip


@pytest.mark.parametrize(
    ("row", "problem"),
    [('{"md5": "a", "caption_en": "x", "bw": 64 "bh": 64}', "malformed JSON (Expecting ',' delimiter at column 42)"),
     ('{"md5": "a", "caption_en": "x", "bw": 64}', "missing key 'bh'"),
     ('{"md5": "b", "caption_en": "x", "bw": 64, "bh": 64}', "image {images}/b.jpg does not exist")],
)  # fmt: skip
def test_a_bad_training_row_is_one_line_before_ray(tmp_path, capsys, row, problem):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "a.jpg")
    data = tmp_path / "data.jsonl"
    data.write_text('{"md5": "a", "caption_en": "a black square", "bw": 64, "bh": 64}\n' + row)
    err = _error(capsys, "--set", f"output_dir={tmp_path / 'r'}", "--set", "data.source=jsonl",
                 "--set", f"data.jsonl={data}", "--set", f"data.image_dir={images}")  # fmt: skip
    problem = problem.format(images=images)
    assert err == f"soar-ray: error: data.jsonl: {data}:2: {problem}\n"
    assert not (tmp_path / "r").exists()  # stopped before the run folder, Ray and any actor


def test_bad_geneval_prompts_and_sample_prompts_are_one_line_before_ray(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"tag": "single_object", "include": [{"class": "cat", "count": 1}], '
                       '"prompt": "a photo of a cat"}\n{"tag": "single_object"}\n')  # fmt: skip
    err = _error(capsys, "--set", f"output_dir={tmp_path / 'r'}", "--set",
                 f"data.prompts.path={prompts}", "--set", "data.prompts.kind=geneval",
                 job="jobs/tiny_grpo.yaml")  # fmt: skip
    assert err == f"soar-ray: error: data.prompts: {prompts}:2: 'prompt' must be a non-empty string\n"  # fmt: skip
    samples = tmp_path / "samples.txt"
    samples.write_text("a cat\nbad \x01 line\n")
    err = _error(capsys, "--set", f"output_dir={tmp_path / 'r'}", "--set",
                 f"logging.sample_prompts_file={samples}")  # fmt: skip
    assert err == (f"soar-ray: error: logging.sample_prompts_file: {samples}:2: control "
                   "character '\\x01' in prompt\n")  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_rewards_score_names_a_truncated_image_in_one_line(tmp_path, capsys):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue square\n")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "0.png")
    Image.new("RGB", (32, 32), "blue").save(images / "1.png")
    whole = (images / "1.png").read_bytes()
    (images / "1.png").write_bytes(whole[: len(whole) // 2])  # cut short, as by a full disk
    code = main(["rewards", "score", "--reward", "jpeg_compressibility", "--prompts", str(prompts),
                 "--images", str(images), "--out", str(tmp_path / "s.parquet")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"soar-ray rewards score: error: {images / '1.png'}: unreadable image (")
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.slow
def test_skip_step_skips_diverged_steps_and_stops_after_five_in_a_row(ray_local, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", "jobs/tiny.yaml", "--set", f"output_dir={run_dir}",
                 "--set", "stages.0.optimizer.lr=1.0e+12", "--set", "stages.0.num_steps=12",
                 "--set", "stages.0.optimizer.on_nonfinite=skip_step",
                 "--set", "checkpoint.every=1", "--set", "checkpoint.keep_last=12",
                 "--set", "cluster.num_learners=1", "--set", "cluster.num_rollout_workers=0",
                 "--set", "logging.sample_every=0", "--set", "logging.progress_bar=false",
                 *FAST])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, err
    skips = re.findall(r"stage 0-soar step (\d+): skipped 1 optimizer step\(s\) with a non-finite "
                       r"loss or gradient norm \((\d) in a row\)", out)  # fmt: skip
    first = int(skips[0][0])  # the step after the one whose huge update blew the weights up
    assert [(int(step), int(n)) for step, n in skips] == [(first + k, k + 1) for k in range(5)]
    latest = run_dir / "checkpoints" / f"step-00-{first + 3:07d}"
    assert err == (f"soar-ray: error: stage 0-soar step {first + 4}: 5 optimizer steps in a row "
                   f"were skipped; the run stops without saving this state (last checkpoint: "
                   f"{latest}). Lower optimizer.lr (or optimizer.grad_clip) and start over with "
                   "checkpoint.resume: never, since a resume keeps its checkpoint's optimizer "
                   "settings\n")  # fmt: skip
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0] * (first - 1) + [1] * 5
    # A skipped step changes no weight: the checkpoints of the skipped steps (the fifth stops the
    # run unsaved) hold the weights of the step before the first skip, bit for bit.
    name = "transformer/diffusion_pytorch_model.safetensors"
    saved = [load_file(run_dir / "checkpoints" / f"step-00-{step:07d}" / name)
             for step in range(first - 1, first + 4)]  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for a, b in zip(saved, saved[1:]) for k in a)

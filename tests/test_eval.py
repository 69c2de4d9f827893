"""`soar-ray eval`: targets, prompt sets, seeds and the report (pure), bad input stopped before Ray,
and on a real local Ray a tiny transformer evaluated, then resumed, with images that match
in-process sampling and scores that match the reward run directly."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import rewards
from soar_ray.build import build_sd3
from soar_ray.cli import main
from soar_ray.cluster.rewards import PoolOutput
from soar_ray.config import ConfigError, load_job
from soar_ray.data.prompts import Prompt, load_prompt_set
from soar_ray.eval.command import check_resumable, find_transformer, resolve_prompts
from soar_ray.eval.report import format_table, geneval_summary, score_rows, summarize, write_gallery
from soar_ray.eval.sampling import eval_items
from soar_ray.models import save_transformer
from soar_ray.workers.rollout import generate_images

PROMPTS = ["a red circle on a blue background", 'a sign that says "SOAR"', "a yellow star"]


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory):
    """The tiny preset's transformer, perturbed so it is not the job's own random init."""
    job = load_job("jobs/tiny.yaml")
    transformer = build_sd3(job, components=("transformer",)).transformer
    with torch.no_grad():
        transformer.proj_out.bias.add_(0.1)
    return save_transformer(transformer, tmp_path_factory.mktemp("target") / "transformer")


def _eval(tmp_path, target, *args):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return main(["eval", str(target), "--prompts", str(prompts), "--job", "jobs/tiny.yaml",
                 "--out", str(tmp_path / "eval"), "--steps", "4", "--batch-size", "3",
                 "--set", "logging.progress_bar=false", *args])  # fmt: skip


# ---- pure ----------------------------------------------------------------------------------------


def test_targets_resolve_to_a_transformer_folder(tmp_path, transformer_dir):
    assert find_transformer(transformer_dir) == transformer_dir
    assert find_transformer(transformer_dir.parent) == transformer_dir  # checkpoint / stage
    run = tmp_path / "run"
    run.mkdir()
    job = load_job("jobs/tiny_soar_grpo.yaml", [f"output_dir={run}"])
    from soar_ray.config import dump_config

    (run / "config.yaml").write_text(dump_config(job))
    with pytest.raises(FileNotFoundError, match="no stage of this run has finished"):
        find_transformer(run)
    (run / "soar").symlink_to(transformer_dir.parent)
    assert find_transformer(run) == run / "soar" / "transformer"  # the last finished stage
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        find_transformer(tmp_path)


def test_prompt_sets_by_name_and_by_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SOAR_RAY_PROMPTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SOAR_RAY_PROMPTS_DIR"):
        resolve_prompts("ocr", None)
    (tmp_path / "ocr_test.txt").write_text('a sign that says "A"\n')
    assert resolve_prompts("ocr", None) == (tmp_path / "ocr_test.txt", "ocr")
    with pytest.raises(FileNotFoundError, match="DrawBench is not shipped"):
        resolve_prompts("drawbench", None)
    bench = tmp_path / "drawbench.csv"
    bench.write_text('Prompts,Category\n"A red cube, on a table",Colors\nA cat,Misc\n')
    assert resolve_prompts(str(bench), None) == (bench, "drawbench")
    prompts = load_prompt_set(bench, "drawbench")
    assert [p.text for p in prompts] == ["A red cube, on a table", "A cat"]
    assert prompts[0].metadata == {"category": "Colors"} and prompts[1].source.endswith(":3")
    bench.write_text("Prompt\nA cat\n")
    with pytest.raises(ValueError, match="drawbench.csv:1: .*Prompts column"):
        load_prompt_set(bench, "drawbench")
    assert resolve_prompts(str(tmp_path / "ocr_test.txt"), "text")[1] == "text"


def test_eval_seeds_are_fixed_per_prompt_and_image():
    items = eval_items(3, 2, seed=5)
    assert [(i.prompt_index, i.sample) for i in items] == [(0, 0), (0, 1), (1, 0), (1, 1),
                                                           (2, 0), (2, 1)]  # fmt: skip
    assert items[:4] == eval_items(2, 2, seed=5)  # more prompts do not move the first ones
    assert len({i.seed for i in items}) == 6 and items != eval_items(3, 2, seed=6)
    assert items[3].name == "1_1"


def test_geneval_summary_is_the_mean_over_tags_of_strict_accuracy():
    rows = [
        {"tag": "counting", "dropped": False, "geneval_strict": 1.0, "geneval_accuracy": 1.0},
        {"tag": "counting", "dropped": False, "geneval_strict": 0.0, "geneval_accuracy": 0.5},
        {"tag": "counting", "dropped": False, "geneval_strict": 0.0, "geneval_accuracy": 0.0},
        {"tag": "colors", "dropped": False, "geneval_strict": 1.0, "geneval_accuracy": 1.0},
        {"tag": "colors", "dropped": True, "geneval_strict": 0.0, "geneval_accuracy": 0.0},
    ]
    summary = geneval_summary(rows)
    # counting 1/3, colors 1/1 (the dropped image does not count): overall (1/3 + 1) / 2.
    assert summary["per_tag"] == pytest.approx({"colors": 1.0, "counting": 1 / 3})
    assert summary["overall"] == pytest.approx(2 / 3)
    assert summary["strict"] == pytest.approx(0.5) and summary["accuracy"] == pytest.approx(0.625)
    table = format_table(summarize(rows, ["geneval_strict"]))
    assert "GenEval overall 0.6667" in table and "5 images, 1 dropped" in table


def test_rows_and_gallery_hold_every_score_and_escape_prompts(tmp_path):
    prompts = [Prompt('a <b>bold</b> "sign"', "p:1"), Prompt("a cat", "p:2", {"tag": "x"})]
    items = eval_items(2, 1, seed=0)
    output = PoolOutput(np.array([0.5, 1.5]), {"r": np.array([0.5, 1.5]), "c": np.array([1.0, 2.0])},
                        {"r": np.array([1])}, {"r": 0.1})  # fmt: skip
    rows = score_rows(prompts, items, output)
    assert rows[1] | {"seed": 0} == {
        "image": "images/1_0.png", "prompt_index": 1, "sample": 0, "seed": 0, "prompt": "a cat",
        "tag": "x", "dropped": True, "r": 1.5, "c": 2.0,
    }  # fmt: skip
    assert summarize(rows, ["r", "c"])["scores"]["c"] == {"mean": 1.0, "std": 0.0}
    page = write_gallery(tmp_path, rows, ["r", "c"], "t").read_text()
    assert "a &lt;b&gt;bold&lt;/b&gt; &quot;sign&quot;" in page and "<b>bold" not in page
    assert page.count("<figure>") == 2 and 'src="images/0_0.png"' in page


def test_a_changed_image_setting_refuses_the_folder(tmp_path):
    settings = {"transformer": "/t", "weights": [], "model": "preset:tiny", "prompts": "/p",
                "num_steps": 40, "guidance": 4.5, "resolution": 64, "seed": 0}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(settings | {"rewards": ["a"]}))
    check_resumable(tmp_path, settings | {"rewards": ["b"]})  # rewards may change
    with pytest.raises(ConfigError, match="another guidance \\(4.5, now 3.0\\)"):
        check_resumable(tmp_path, settings | {"guidance": 3.0})


# ---- bad input: one line, before Ray -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--rewards", "jpeg_compresibility"], "--rewards: unknown reward 'jpeg_compresibility'"),
        (["--rewards", "pickscore"], "--rewards: 'pickscore' is not configured"),
        (["--rewards", "geneval"], "--rewards geneval: needs GenEval metadata prompts"),
        (["--rewards", "jpeg_compressibility", "--steps", "0"], "--steps: must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_ray(tmp_path, transformer_dir, capsys, args, expected):
    assert _eval(tmp_path, transformer_dir, *args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "eval").exists()  # stopped before anything was written


# ---- on a real local Ray -------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_samples_scores_reports_and_resumes(ray_local, tmp_path, transformer_dir, capsys):
    args = ["--rewards", "jpeg_compressibility", "--images-per-prompt", "2"]
    assert _eval(tmp_path, transformer_dir, *args) == 0
    out = tmp_path / "eval"
    assert "jpeg_compressibility" in capsys.readouterr().out
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["0_0.png", "0_1.png", "1_0.png", "1_1.png", "2_0.png", "2_1.png"]
    table = pq.read_table(out / "scores.parquet").to_pylist()
    assert [(r["prompt_index"], r["sample"]) for r in table] == [(0, 0), (0, 1), (1, 0), (1, 1),
                                                                 (2, 0), (2, 1)]  # fmt: skip
    # The images are the transformer's: in-process sampling with the same seeds, whole batch.
    job = load_job("jobs/tiny.yaml")
    model = build_sd3(job)
    model.transformer.load_state_dict(
        type(model.transformer).from_pretrained(transformer_dir).state_dict()
    )
    items = eval_items(3, 2, seed=0)
    from soar_ray.metrics import to_uint8_images

    expected = to_uint8_images(generate_images(
        model, [PROMPTS[i.prompt_index] for i in items], height=64, width=64, num_steps=4,
        guidance=4.5, seeds=[i.seed for i in items],
    ))  # fmt: skip
    made = np.stack([np.asarray(Image.open(out / r["image"])) for r in table])
    assert np.abs(made.astype(int) - expected.astype(int)).max() <= 1  # batch of 3 vs 6
    # Scores are the reward's own on the saved images.
    direct = rewards.load("jpeg_compressibility").score(list(made), [r["prompt"] for r in table])
    np.testing.assert_allclose([r["jpeg_compressibility"] for r in table], direct.scores)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 6 and summary["settings"]["num_steps"] == 4
    assert summary["scores"]["jpeg_compressibility"]["mean"] == pytest.approx(direct.scores.mean())
    assert (out / "grid.png").is_file() and (out / "index.html").read_text().count("<figure>") == 6

    # Resume: one image lost; only it is made again, identical, and everything is rescored.
    before = (out / "images" / "1_1.png").read_bytes()
    (out / "images" / "1_1.png").unlink()
    stamp = (out / "images" / "0_0.png").stat().st_mtime_ns
    assert _eval(tmp_path, transformer_dir, *args) == 0
    assert "3 prompts x 2 images (5 already made)" in capsys.readouterr().out
    assert (out / "images" / "1_1.png").read_bytes() == before
    assert (out / "images" / "0_0.png").stat().st_mtime_ns == stamp
    assert pq.read_table(out / "scores.parquet").to_pylist() == table


def test_model_transformer_replaces_the_preset_transformer(tmp_path, transformer_dir):
    saved = type(build_sd3(load_job("jobs/tiny.yaml"), components=("transformer",)).transformer)
    expected = saved.from_pretrained(transformer_dir).state_dict()
    job = load_job("jobs/tiny.yaml", [f"model.transformer={transformer_dir}"])
    for components in (("transformer",), None):  # a GRPO learner's parts, and every part
        kwargs = {} if components is None else {"components": components}
        model = build_sd3(job, **kwargs)
        for key, value in model.transformer.state_dict().items():
            assert torch.equal(value, expected[key]), key
    missing = load_job("jobs/tiny.yaml", [f"model.transformer={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="model.transformer: folder not found"):
        missing.validate_paths()

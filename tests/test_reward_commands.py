"""`soar-ray rewards check | score` on real OCR and GenEval (yolo) models: the check table, a
missing checkpoint, Parquet scores of a folder and the image-to-prompt naming rule."""

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont

from soar_ray.reward_commands import add_reward_commands, match_images

GRPO_JOB = """\
data: {source: synthetic, prompts: {path: prompts.txt}}
stages: [{algorithm: grpo, rewards: {ocr: 1.0, geneval: 0.5}, eval_every: 0}]
cluster: {num_rollout_workers: 1}
rewards:
  ocr: {device: cpu, options: {num_threads: 1}}
"""


def run(argv: list[str]) -> int:
    """Parse `soar-ray rewards ...` as the CLI does and run the command."""
    parser = argparse.ArgumentParser(prog="soar-ray")
    add_reward_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["rewards", *argv])
    return args.func(args)


def rendered(text: str) -> Image.Image:
    image = Image.new("RGB", (160, 48), "white")
    ImageDraw.Draw(image).text((6, 8), text, fill="black", font=ImageFont.load_default(size=28))
    return image


def test_check_prints_the_table_of_configured_rewards(tmp_path: Path, capsys) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(GRPO_JOB)
    assert run(["check", str(job)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["reward", "backend", "checkpoint", "status", "time", "score"]
    ocr, geneval = lines[2], lines[3]
    assert ocr.startswith("ocr ") and "rapidocr PP-OCR (onnxruntime), engine shipped, cpu" in ocr
    assert "bundled" in ocr and " ok " in ocr and ocr.endswith("1.0000")  # reads the probe's text
    assert geneval.startswith("geneval ") and "yolov3-tiny, auto" in geneval and " ok " in geneval
    assert float(ocr.split(" s ")[0].split()[-1]) > 0  # the time column


def test_check_fails_on_a_missing_checkpoint(tmp_path: Path, capsys) -> None:
    job = tmp_path / "job.yaml"
    missing = tmp_path / "no-such-folder"
    job.write_text(GRPO_JOB + f"  pickscore: {{options: {{model_path: {missing}}}}}\n")
    assert run(["check", str(job)]) == 1
    captured = capsys.readouterr()
    pickscore = next(line for line in captured.out.splitlines() if line.startswith("pickscore"))
    assert f"model_path={missing}" in pickscore and "missing checkpoint" in pickscore
    assert f"pickscore: reward 'pickscore': model_path='{missing}' does not exist" in captured.err
    assert "1 of 3 reward(s) failed" in captured.err


def test_score_writes_one_parquet_row_per_image(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('# OCR prompts\na sign "SOAR"\n\na sign "RAY"\na sign "FLOW"\n')
    images = tmp_path / "images"
    images.mkdir()
    rendered("SOAR").save(images / "0.png")
    rendered("RAY").save(images / "1_0.png")
    Image.new("RGB", (160, 48), "white").save(images / "1_1.jpg")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "scores.parquet"
    argv = ["score", "--reward", "ocr", "--prompts", str(prompts), "--images", str(images),
            "--device", "cpu", "--option", "num_threads=1", "--out", str(out)]  # fmt: skip
    assert run(argv) == 0
    table = pq.read_table(out).to_pydict()
    assert table["image"] == ["0.png", "1_0.png", "1_1.jpg"]
    assert table["prompt_index"] == [0, 1, 1]
    assert table["prompt"] == ['a sign "SOAR"', 'a sign "RAY"', 'a sign "RAY"']
    assert table["score"] == [1.0, 1.0, 0.0] and table["ocr_exact"] == [1.0, 1.0, 0.0]
    assert table["dropped"] == [False, False, False]
    text = capsys.readouterr().out
    std = np.std([1.0, 1.0, 0.0])
    assert f"ocr: 3 images of 2/3 prompts -> {out}" in text
    assert f"mean 0.6667  std {std:.4f}  min 0.0000  max 1.0000" in text


def test_image_names_map_to_prompt_indices(tmp_path: Path, capsys) -> None:
    for name in ("10-seed3.png", "2.png", "2_1.webp", "readme.md"):
        (tmp_path / name).write_bytes(b"")
    pairs = match_images(tmp_path, num_prompts=11)
    assert [(path.name, index) for path, index in pairs] == [
        ("2.png", 2), ("2_1.webp", 2), ("10-seed3.png", 10),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"10-seed3.png: prompt index 10, but the prompt file has "
                       r"3 prompts \(indices 0-2\)"):  # fmt: skip
        match_images(tmp_path, num_prompts=3)
    (tmp_path / "cat.png").write_bytes(b"")
    with pytest.raises(ValueError, match="cat.png: the name must start with its prompt index"):
        match_images(tmp_path, num_prompts=11)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a "b"\n')
    argv = ["score", "--reward", "ocr", "--prompts", str(prompts), "--images", str(tmp_path)]
    assert run(argv) == 2
    assert "error: " in capsys.readouterr().err
    assert run([*argv[:-1], str(tmp_path / "absent")]) == 2
    assert "absent is not a folder" in capsys.readouterr().err

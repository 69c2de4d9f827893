"""`soar-ray prepare` on Ray Data: the single-process writer's bytes, resumable at shard level."""

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from soar_ray.cli import main
from soar_ray.data.cache import LatentCacheDataset, plan_shards, write_latent_cache
from soar_ray.data.dataset import ImageCaptionDataset
from soar_ray.data.synthetic import make_synthetic_set

BATCH_SIZE, ROWS_PER_SHARD = 4, 8


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> ImageCaptionDataset:
    """30 synthetic images in two buckets, indexed with two bad rows that `skip` counts."""
    folder = tmp_path_factory.mktemp("source")
    synthetic = make_synthetic_set(folder / "synthetic", num_images=30)
    lines = synthetic.jsonl_path.read_text().splitlines()
    bad = ['{"md5": "a", "caption_en": "x", "bw": 64 "bh": 64}',
           '{"md5": "gone", "caption_en": "x", "bw": 64, "bh": 64}']  # fmt: skip
    jsonl = folder / "data.jsonl"
    jsonl.write_text("\n".join([*lines[:10], bad[0], *lines[10:20], bad[1], *lines[20:]]) + "\n")
    return ImageCaptionDataset(jsonl, synthetic.image_dir, on_bad_sample="skip")


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _prepare(source: ImageCaptionDataset, out: Path, *flags: str) -> int:
    return main(["prepare", "jobs/tiny.yaml", "--out", str(out), "--set", "data.source=jsonl",
                 "--set", f"data.jsonl={source.jsonl_path}", "--set",
                 f"data.image_dir={source.image_dir}", "--set", "data.on_bad_sample=skip",
                 "--set", f"output_dir={out.parent / 'run'}", "--batch-size", str(BATCH_SIZE),
                 "--rows-per-shard", str(ROWS_PER_SHARD), *flags])  # fmt: skip


@pytest.mark.slow
def test_ray_prepare_writes_the_same_bytes_stops_at_a_bad_image_and_resumes(
    ray_local, source: ImageCaptionDataset, tmp_path: Path, capsys, caplog
) -> None:
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert _prepare(source, local) == 0
    expected = _files(local)
    manifest = json.loads(expected["manifest.json"])
    assert manifest["skipped"] == {"malformed_json": 1, "missing_image": 1}
    # 15 rows per bucket in batches of 4; shard 1 holds the end of one bucket and a batch of the next.
    assert [shard["num_rows"] for shard in manifest["shards"]] == [8, 11, 8, 3]
    # A truncated image (its header still reads) in the second batch of shard 2: the Ray run
    # stops there with the single-process message, after writing shards 0 and 1.
    shards = plan_shards(source, model_id="", dtype="float16", batch_size=BATCH_SIZE,
                         rows_per_shard=ROWS_PER_SHARD)  # fmt: skip
    row = source.rows[shards[2].batches[1][0]]
    intact = row.image_path.read_bytes()
    row.image_path.write_bytes(intact[: len(intact) // 2])
    try:
        assert _prepare(source, on_ray, "--workers", "2") == 2
    finally:
        row.image_path.write_bytes(intact)
    err = capsys.readouterr().err
    assert f"{source.jsonl_path}:{row.line_no}: image {row.image_path} failed to decode" in err
    assert "Traceback" not in err
    assert sorted(_files(on_ray)) == ["shard-00000.parquet", "shard-00001.parquet",
                                      "shard-00002.parquet.partial"]  # fmt: skip
    # Debris: a shard beyond the plan and another plan's shard under a planned name.
    (on_ray / "shard-00007.parquet").write_bytes(expected["shard-00000.parquet"])
    (on_ray / "shard-00001.parquet").write_bytes(expected["shard-00000.parquet"])
    kept = os.stat(on_ray / "shard-00000.parquet")
    with caplog.at_level(logging.INFO, logger="soar_ray.data.cache"):
        assert _prepare(source, on_ray, "--workers", "1") == 0
    assert "resuming with 1 of 4 shards complete; removed 2 from another plan" in caplog.text
    again = os.stat(on_ray / "shard-00000.parquet")
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert _files(on_ray) == expected
    assert len(LatentCacheDataset(on_ray, model_id=manifest["model_id"])) == 30


def pool_latents(pixels_BCHW: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: 8x average pooling."""
    return F.avg_pool2d(pixels_BCHW, 8)


def caption_embed(captions: list[str]) -> dict[str, torch.Tensor]:
    """A stand-in text encoder: the caption's first bytes."""
    codes = [list(c.encode().ljust(6)[:6]) for c in captions]
    return {"prompt_embeds": torch.tensor(codes, dtype=torch.float32)[:, None, :]}


class Counted:
    """`pool_latents` counting its batch sizes; the process is stopped at batch `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.sizes: list[int] = []
        self.stop_at = stop_at

    def __call__(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(pixels_BCHW))
        if len(self.sizes) == self.stop_at:
            raise KeyboardInterrupt
        return pool_latents(pixels_BCHW)


def test_an_interrupted_cache_resumes_at_its_first_unfinished_shard(
    source: ImageCaptionDataset, tmp_path: Path
) -> None:
    settings = {"encode_prompts": caption_embed, "batch_size": BATCH_SIZE,
                "rows_per_shard": ROWS_PER_SHARD}  # fmt: skip
    reference, cache = tmp_path / "reference", tmp_path / "cache"
    write_latent_cache(source, reference, encode_images=pool_latents, model_id="m", **settings)
    with pytest.raises(KeyboardInterrupt):
        write_latent_cache(source, cache, encode_images=Counted(stop_at=6), model_id="m",
                           **settings)  # fmt: skip
    # Batches of 4 4 | 4 3 4 | 4 4 | 3 rows: the sixth is the first of shard 2.
    assert sorted(_files(cache)) == ["shard-00000.parquet", "shard-00001.parquet"]
    resumed = Counted()
    write_latent_cache(source, cache, encode_images=resumed, model_id="m", **settings)
    assert resumed.sizes == [4, 4, 3]  # shards 2 and 3 only
    assert _files(cache) == _files(reference)
    # A complete cache is refused; overwrite starts from nothing.
    with pytest.raises(ValueError, match="manifest.json exists; pass overwrite=True"):
        write_latent_cache(source, cache, encode_images=pool_latents, model_id="m", **settings)
    rebuilt = Counted()
    write_latent_cache(source, cache, encode_images=rebuilt, model_id="m", overwrite=True,
                       **settings)  # fmt: skip
    assert rebuilt.sizes == [4, 4, 4, 3, 4, 4, 4, 3] and _files(cache) == _files(reference)
    # An unfinished cache of another model (or dtype, or rows) is not this plan's: all encoded.
    (cache / "manifest.json").unlink()
    other = Counted()
    write_latent_cache(source, cache, encode_images=other, model_id="other", **settings)
    assert other.sizes == [4, 4, 4, 3, 4, 4, 4, 3]
    assert LatentCacheDataset(cache, model_id="other").manifest["num_rows"] == 30


@pytest.mark.parametrize(
    ("flags", "problem"),
    [(["--workers", "-1"], "--workers: must be >= 0, got -1"),
     (["--rows-per-shard", "0"], "--rows-per-shard: must be >= 1, got 0"),
     ([], "{out} holds a complete cache; pass --overwrite to rebuild it")],
)  # fmt: skip
def test_prepare_refusals_are_one_line(tmp_path: Path, capsys, flags, problem) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    code = main(["prepare", "jobs/tiny.yaml", "--out", str(out), "--set",
                 f"output_dir={tmp_path / 'run'}", *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err == f"soar-ray: error: {problem.format(out=out)}\n"
    assert not (tmp_path / "run").exists()

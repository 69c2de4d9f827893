"""Parquet latent cache: exact round trip (tiny SD3 and plain encoders), identity, corruption."""

import json
import re
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from soar_ray.data.cache import LatentCacheDataset, read_uncond, write_latent_cache
from soar_ray.data.dataset import ImageCaptionDataset, collate_samples
from soar_ray.data.sampler import BucketBatchSampler
from soar_ray.data.synthetic import make_synthetic_set

MODEL_ID = "pool-hash"


class Recorder:
    """Wraps the encoders and keeps every output, in call order, as the expected cache content."""

    def __init__(self, encode_images, encode_prompts) -> None:
        self._encode_images, self._encode_prompts = encode_images, encode_prompts
        self.latents: list[torch.Tensor] = []  # one per row
        self.conds: list[dict[str, torch.Tensor]] = []  # one per call; the last is uncond

    def images(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        latents = self._encode_images(pixels_BCHW)
        self.latents.extend(latents.clone())
        return latents

    def prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        cond = self._encode_prompts(captions)
        self.conds.append({key: value.clone() for key, value in cond.items()})
        return cond

    def row_cond(self, index: int) -> dict[str, torch.Tensor]:
        keys = self.conds[0]
        return {k: torch.cat([c[k] for c in self.conds[:-1]])[index] for k in keys}


def pool_latents(pixels_BCHW: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: 8x average pooling."""
    return F.avg_pool2d(pixels_BCHW, 8)


def hash_embed(captions: list[str]) -> dict[str, torch.Tensor]:
    """A stand-in text encoder: Gaussian embeddings seeded by the caption's CRC."""
    gens = [torch.Generator().manual_seed(zlib.crc32(c.encode())) for c in captions]
    return {
        "prompt_embeds": torch.stack([torch.randn(5, 4, generator=g) for g in gens]),
        "pooled_embeds": torch.stack([torch.randn(3, generator=g) for g in gens]),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ImageCaptionDataset:
    synthetic = make_synthetic_set(tmp_path_factory.mktemp("synthetic"), num_images=10)
    return ImageCaptionDataset(synthetic.jsonl_path, synthetic.image_dir)


def _check_round_trip(cache: LatentCacheDataset, dataset, recorder: Recorder, cast) -> None:
    # Rows are written bucket by bucket, 64x48 before 64x64, in index order within a bucket.
    order = sorted(range(len(dataset)), key=lambda i: (dataset.buckets[i], i))
    assert len(cache) == len(dataset) == len(recorder.latents)
    for k, index in enumerate(order):
        sample = cache[k]
        assert sample["md5"] == dataset.rows[index].md5
        assert sample["caption"] == dataset.rows[index].caption
        assert (sample["bw"], sample["bh"]) == dataset.buckets[index]
        assert sample["latents"].dtype == torch.float32
        assert torch.equal(sample["latents"], cast(recorder.latents[k]))
        expected = recorder.row_cond(k)
        assert sample["cond"].keys() == expected.keys()
        for key in expected:
            assert torch.equal(sample["cond"][key], cast(expected[key]))
    uncond = cache.uncond_cond()
    for key, value in recorder.conds[-1].items():
        assert torch.equal(uncond[key], cast(value))
    # The shard-free reader (used by learners and rollout workers) gives the same tensors.
    direct = read_uncond(cache.cache_dir, cache.manifest["model_id"])
    assert direct.keys() == uncond.keys()
    assert all(torch.equal(direct[key], uncond[key]) for key in uncond)


def test_round_trip_tiny_sd3(dataset: ImageCaptionDataset, tmp_path: Path) -> None:
    from soar_ray.models import TEXT_ENCODERS, build_model

    model = build_model("tiny", components=("vae", *TEXT_ENCODERS))
    recorder = Recorder(model.encode_images, model.encode_prompts)
    manifest_path = write_latent_cache(
        dataset,
        tmp_path,
        encode_images=recorder.images,
        encode_prompts=recorder.prompts,
        model_id="sd3:tiny",
        batch_size=5,
        rows_per_shard=4,
    )
    manifest = json.loads(manifest_path.read_text())
    # 5 rows per bucket, one batch each; a shard closes once it holds >= 4 rows.
    assert manifest["shards"] == [
        {"file": "shard-00000.parquet", "num_rows": 5},
        {"file": "shard-00001.parquet", "num_rows": 5},
    ]
    assert manifest["buckets"] == {
        "64x48": {"num_rows": 5, "latent_shape": [16, 6, 8]},
        "64x64": {"num_rows": 5, "latent_shape": [16, 8, 8]},
    }
    cond_shapes = {k: list(v.shape[1:]) for k, v in recorder.conds[0].items()}
    assert manifest["cond_shapes"] == cond_shapes and manifest["num_rows"] == 10
    cache = LatentCacheDataset(tmp_path, model_id="sd3:tiny")
    _check_round_trip(cache, dataset, recorder, cast=lambda x: x)
    # The same bucket sampler and collation serve the cache.
    sampler = BucketBatchSampler(cache.buckets, batch_size=2)
    batch = collate_samples([cache[i] for i in sampler.epoch_batches(0)[0]])
    assert batch["latents"].shape == (2, 16, batch["bh"] // 8, batch["bw"] // 8)
    assert {k: list(v.shape) for k, v in batch["cond"].items()} == {
        k: [2, *shape] for k, shape in cond_shapes.items()
    }


def test_float16_round_trip_and_range(dataset: ImageCaptionDataset, tmp_path: Path) -> None:
    recorder = Recorder(pool_latents, hash_embed)
    write_latent_cache(
        dataset,
        tmp_path,
        encode_images=recorder.images,
        encode_prompts=recorder.prompts,
        model_id=MODEL_ID,
        dtype="float16",
        batch_size=2,
        rows_per_shard=4,
    )
    # Shards of 4, 5 and 1 rows in row groups of 2 or 1: reads cross shards and row groups.
    assert len(list(tmp_path.glob("shard-*.parquet"))) == 3
    cache = LatentCacheDataset(tmp_path, model_id=MODEL_ID)
    _check_round_trip(cache, dataset, recorder, cast=lambda x: x.half().float())
    with pytest.raises(ValueError, match="latents exceeds the float16 range"):
        write_latent_cache(
            dataset,
            tmp_path / "big",
            encode_images=lambda x: pool_latents(x) * 1e5,
            encode_prompts=hash_embed,
            model_id=MODEL_ID,
            dtype="float16",
        )
    with pytest.raises(ValueError, match="cond 'pooled_embeds' has non-finite values"):
        write_latent_cache(
            dataset,
            tmp_path / "nan",
            encode_images=pool_latents,
            model_id=MODEL_ID,
            encode_prompts=lambda c: {
                **hash_embed(c),
                "pooled_embeds": torch.full((len(c), 3), torch.nan),
            },
        )


@pytest.fixture
def cache_dir(dataset: ImageCaptionDataset, tmp_path: Path) -> Path:
    write_latent_cache(
        dataset,
        tmp_path,
        encode_images=pool_latents,
        encode_prompts=hash_embed,
        model_id=MODEL_ID,
        batch_size=4,
        rows_per_shard=4,
    )
    return tmp_path


def test_model_identity_mismatch_refused(cache_dir: Path) -> None:
    message = "cache built with model 'pool-hash', this run uses 'sd3:medium'"
    with pytest.raises(ValueError, match=re.escape(f"{cache_dir / 'manifest.json'}: {message}")):
        LatentCacheDataset(cache_dir, model_id="sd3:medium")


def test_corrupt_files_are_named(cache_dir: Path) -> None:
    manifest_path = cache_dir / "manifest.json"
    manifest_text = manifest_path.read_text()
    manifest_path.write_text(manifest_text[:40])
    with pytest.raises(ValueError, match=re.escape(f"{manifest_path} is corrupt")):
        LatentCacheDataset(cache_dir, model_id=MODEL_ID)
    manifest_path.write_text(json.dumps({**json.loads(manifest_text), "shards": [{"file": 3}]}))
    with pytest.raises(ValueError, match=re.escape(f"{manifest_path} is corrupt: field 'file'")):
        LatentCacheDataset(cache_dir, model_id=MODEL_ID)
    manifest_path.write_text(manifest_text)
    shard = cache_dir / "shard-00001.parquet"
    shard.write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match=re.escape(f"{shard} is not a readable Parquet file")):
        LatentCacheDataset(cache_dir, model_id=MODEL_ID)
    manifest_path.unlink()
    with pytest.raises(ValueError, match="manifest.json not found"):
        LatentCacheDataset(cache_dir, model_id=MODEL_ID)


def test_row_count_and_cell_size_checked(cache_dir: Path) -> None:
    manifest_path = cache_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["num_rows"] += 1
    manifest_path.write_text(json.dumps(manifest))
    shard = cache_dir / "shard-00000.parquet"
    with pytest.raises(ValueError, match=re.escape(f"{shard} holds 4 rows, manifest 5")):
        LatentCacheDataset(cache_dir, model_id=MODEL_ID)
    manifest["shards"][0]["num_rows"] -= 1
    manifest_path.write_text(json.dumps(manifest))
    table = pq.read_table(shard)
    cut = pa.array([blob[:-2] for blob in table.column("latents").to_pylist()], pa.binary())
    pq.write_table(table.set_column(table.schema.get_field_index("latents"), "latents", cut), shard)
    cache = LatentCacheDataset(cache_dir, model_id=MODEL_ID)
    with pytest.raises(ValueError, match=re.escape(f"{shard} row group 0 row 1, latents: ")):
        cache[1]


def test_existing_cache_and_flipping_dataset_refused(
    cache_dir: Path, dataset: ImageCaptionDataset
) -> None:
    encoders = {"encode_images": pool_latents, "encode_prompts": hash_embed, "model_id": "b"}
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        write_latent_cache(dataset, cache_dir, **encoders)
    write_latent_cache(dataset, cache_dir, **encoders, overwrite=True)
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        "manifest.json",
        "shard-00000.parquet",
        "uncond.parquet",
    ]
    assert len(LatentCacheDataset(cache_dir, model_id="b", max_samples=3)) == 3
    flipping = ImageCaptionDataset(dataset.jsonl_path, dataset.image_dir, random_flip=True)
    with pytest.raises(ValueError, match="random_flip=False"):
        write_latent_cache(flipping, cache_dir / "other", **encoders)


def test_shuffled_reads_decode_each_row_group_once(dataset, tmp_path: Path) -> None:
    """A cache that fits the reader's budget is decoded once, however the batches shuffle it
    (decoding a whole row group per sample was the data path's cost): 10 groups here."""
    write_latent_cache(dataset, tmp_path, encode_images=pool_latents, encode_prompts=hash_embed,
                       model_id=MODEL_ID, batch_size=1, rows_per_shard=1)  # fmt: skip
    cache = LatentCacheDataset(tmp_path, model_id=MODEL_ID)
    decoded: list[tuple[int, int]] = []
    for shard in range(len(cache.manifest["shards"])):
        parquet = cache._file(shard)
        read = parquet.read_row_group

        def counted(group, *args, _read=read, _shard=shard, **kwargs):
            decoded.append((_shard, group))
            return _read(group, *args, **kwargs)

        parquet.read_row_group = counted
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(0)).tolist()
    for index in order + order[::-1]:
        cache.get(index)
    assert len(decoded) == len(set(decoded)) == 10  # each group once

"""Parquet cache of VAE latents and text embeddings, read back as a bucketed dataset.

Folder layout:
  shard-00000.parquet ...  rows grouped by bucket; one Parquet row group per encoded batch
  uncond.parquet           one row: the cond of the empty prompt "" (CFG and cond dropout need it,
                           so a run from the cache needs no text encoder)
  manifest.json            written last (atomically): its presence marks a complete cache
Shard columns (uncond.parquet holds only the cond columns):
  md5 string, caption string, bw int32, bh int32
  latents        binary        raw little-endian bytes, C order, dtype from the manifest
  latents_shape  list<int32>   [C, h, w]; varies with the bucket
  cond.<key>     binary        one column per cond key (e.g. cond.prompt_embeds); the per-sample
                               shape is fixed for the cache and kept in the manifest
Precision: tensors are stored as float32 (the default, exact) or float16 (half the size, rounded);
non-finite values and values beyond the float16 range are refused, never stored as inf. The
reader returns float32 tensors.
manifest.json: schema_version, model_id, dtype, num_rows, shards [{file, num_rows}],
buckets {"WxH": {num_rows, latent_shape}}, cond_shapes {key: shape}, skipped {reason: count}.
`model_id` is the identity string the caller passes (model, preset, weights revision); the reader
refuses a cache built with any other.

Writing: a plan fixed in advance (`plan_shards`) cuts the rows, by bucket, into encode batches and
shards. Each shard is written under `<name>.partial` and renamed when complete, with its plan's
key in the Parquet footer (`SHARD_KEY`); a rerun keeps the shards whose key matches and encodes
the rest (`begin_cache`). `write_latent_cache` encodes in this process, `cache_ray.py` on Ray
actors; both share the plan, the shard writer and the manifest, so they write the same bytes.
"""

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from soar_ray.data.dataset import ImageCaptionDataset, Row, collate_samples

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
MANIFEST = "manifest.json"
UNCOND = "uncond.parquet"
SHARD_KEY = b"soar_ray.shard_key"
"""Parquet footer metadata of a shard: the key of its plan (`ShardPlan.key`)."""
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_MANIFEST_FIELDS = {
    "schema_version": int,
    "model_id": str,
    "dtype": str,
    "num_rows": int,
    "shards": list,
    "cond_shapes": dict,
}
# Bytes of decoded row groups a reader keeps (least recently used dropped first). Shuffled batches
# read rows of every group, and decoding a whole group for one row is the data path's cost, so a
# cache that fits here is decoded once (a 20000-sample, 32 px cache is about 0.6 GiB).
_CACHED_GROUP_BYTES = 2**30


def _schema(cond_keys: list[str], with_sample_columns: bool = True) -> pa.Schema:
    """Arrow schema of a shard (or of uncond.parquet without the sample columns)."""
    fields = [pa.field(f"cond.{key}", pa.binary()) for key in cond_keys]
    if not with_sample_columns:
        return pa.schema(fields)
    sample_fields = [
        pa.field("md5", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("bw", pa.int32()),
        pa.field("bh", pa.int32()),
        pa.field("latents", pa.binary()),
        pa.field("latents_shape", pa.list_(pa.int32())),
    ]
    return pa.schema(sample_fields + fields)


def _stored(name: str, x: torch.Tensor, num_rows: int, dtype: str) -> np.ndarray:
    """A batch-first tensor as a C-order array of the storage dtype, checked before any precision
    loss."""
    if x.ndim == 0 or x.shape[0] != num_rows:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected batch size {num_rows} first")
    # Host-device sync when the encoders run on a GPU; float32 first so the checks see exact values.
    x32 = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x32).all():
        raise ValueError(f"{name} has non-finite values; refusing to cache them")
    if dtype == "float16" and x32.abs().max() > _FLOAT16_MAX:
        raise ValueError(f"{name} exceeds the float16 range; cache with dtype='float32'")
    return np.ascontiguousarray(x32.numpy().astype(DTYPES[dtype]))


def encode_batch(
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
    captions: list[str],
    pixels_BCHW: torch.Tensor | None,
    dtype: str,
) -> dict[str, np.ndarray]:
    """The encoding of one batch in the storage dtype: `latents` [B, C, h, w] (when pixels are
    given) and `cond.<key>` [B, ...] per cond key. The one encoding step of both writers."""
    arrays = {}
    if pixels_BCHW is not None:
        arrays["latents"] = _stored("latents", encode_images(pixels_BCHW), len(captions), dtype)
    for key, value in sorted(encode_prompts(captions).items()):
        arrays[f"cond.{key}"] = _stored(f"cond {key!r}", value, len(captions), dtype)
    return arrays


def load_batch(dataset: ImageCaptionDataset, indices: list[int]) -> dict[str, Any]:
    """Samples `indices` of one bucket, decoded, resized and collated (pixels [B, 3, bh, bw])."""
    return collate_samples([dataset.get(index, epoch=0) for index in indices])


def _rows(array: np.ndarray) -> list[bytes]:
    """Per-sample raw bytes (C order) of a batch-first array."""
    return [array[i].tobytes() for i in range(len(array))]


def _cond_columns(
    arrays: dict[str, np.ndarray], cond_shapes: dict[str, list[int]]
) -> dict[str, list[bytes]]:
    """The cond.<key> columns of an encoded batch; the first call fixes the keys and shapes."""
    cond = {name.removeprefix("cond."): a for name, a in arrays.items() if name.startswith("cond.")}
    if not cond_shapes:
        cond_shapes.update({key: list(value.shape[1:]) for key, value in sorted(cond.items())})
    if sorted(cond) != sorted(cond_shapes):
        raise ValueError(
            f"encode_prompts returned keys {sorted(cond)}, earlier {sorted(cond_shapes)}"
        )
    for key, value in cond.items():
        if list(value.shape[1:]) != cond_shapes[key]:
            shape = list(value.shape[1:])
            raise ValueError(f"cond {key!r} per-sample shape {shape} != {cond_shapes[key]}")
    return {f"cond.{key}": _rows(value) for key, value in cond.items()}


def _shard_columns(
    rows: list[Row], arrays: dict[str, np.ndarray], cond_shapes: dict[str, list[int]]
) -> dict[str, list[Any]]:
    """Shard columns of one encoded batch of dataset rows."""
    latents = arrays["latents"]
    return {
        "md5": [row.md5 for row in rows],
        "caption": [row.caption for row in rows],
        "bw": [row.bw for row in rows],
        "bh": [row.bh for row in rows],
        "latents": _rows(latents),
        "latents_shape": [list(latents.shape[1:])] * len(rows),
        **_cond_columns(arrays, cond_shapes),
    }


def _bucket_chunks(buckets: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by bucket (sorted) and cut into batches: every batch stacks."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    return [
        by_bucket[bucket][start : start + batch_size]
        for bucket in sorted(by_bucket)
        for start in range(0, len(by_bucket[bucket]), batch_size)
    ]


@dataclass(frozen=True)
class ShardPlan:
    """One shard of a cache being written: its encode batches (dataset indices) and its key."""

    index: int
    batches: list[list[int]]
    key: str
    """sha256 of all the shard's bytes depend on besides the encoders' weights: schema version,
    model id, dtype, and each row's md5, caption and bucket, batch by batch."""

    @property
    def file(self) -> str:
        return f"shard-{self.index:05d}.parquet"

    @property
    def num_rows(self) -> int:
        return sum(len(batch) for batch in self.batches)


def plan_shards(
    dataset: ImageCaptionDataset, *, model_id: str, dtype: str, batch_size: int, rows_per_shard: int
) -> list[ShardPlan]:
    """The fixed layout of a cache: rows by bucket (sorted), in index order, cut into encode
    batches; a shard closes at the first batch boundary at or past `rows_per_shard` rows (so one
    may exceed it by a batch). It depends on the arguments alone, so a rerun plans the same."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size <= 0 or rows_per_shard <= 0:
        raise ValueError(f"batch_size={batch_size}, rows_per_shard={rows_per_shard}: need > 0")
    if dataset.random_flip:
        raise ValueError("a latent cache stores one view per image; use random_flip=False")
    groups: list[list[list[int]]] = []
    for chunk in _bucket_chunks(dataset.buckets, batch_size):
        if not groups or sum(map(len, groups[-1])) >= rows_per_shard:
            groups.append([])
        groups[-1].append(chunk)
    return [ShardPlan(index, batches, _shard_key(dataset, batches, model_id, dtype))
            for index, batches in enumerate(groups)]  # fmt: skip


def _shard_key(
    dataset: ImageCaptionDataset, batches: list[list[int]], model_id: str, dtype: str
) -> str:
    """`ShardPlan.key` of a shard holding `batches` of `dataset`."""
    rows = [[dataset.rows[index] for index in batch] for batch in batches]
    fields = [[(row.md5, row.caption, row.bw, row.bh) for row in batch] for batch in rows]
    content = json.dumps([SCHEMA_VERSION, model_id, dtype, fields]).encode()
    return hashlib.sha256(content).hexdigest()


def _stored_key(path: Path) -> str | None:
    """The plan key in a shard file's footer; None for a file that is not a readable shard."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    key = metadata.get(SHARD_KEY)
    return key.decode() if key is not None else None


def begin_cache(out_dir: Path, shards: list[ShardPlan], overwrite: bool) -> list[ShardPlan]:
    """Make `out_dir` ready for `shards`; returns those still to write. A complete cache (one with
    a manifest) is refused unless `overwrite`, which also starts from nothing. Otherwise shards
    an unfinished run completed for the same plan are kept: complete means under the shard's
    final name (only a fully written file gets it) with the planned key. The rest is removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise ValueError(f"{out_dir / MANIFEST} exists; pass overwrite=True to rebuild the cache")
    planned = {shard.file: shard.key for shard in shards}
    kept, removed = set(), 0
    for path in sorted(out_dir.glob("shard-*.parquet")):
        if not overwrite and planned.get(path.name) == _stored_key(path):
            kept.add(path.name)
        else:
            path.unlink()
            removed += 1
    for path in [out_dir / MANIFEST, out_dir / UNCOND, *out_dir.glob("*.partial")]:
        path.unlink(missing_ok=True)
    if kept or (removed and not overwrite):
        # A warning, so it shows without logging set up: this run reuses or drops earlier work.
        logger.warning("%s: resuming with %d of %d shards complete; removed %d from another plan "
                       "or run", out_dir, len(kept), len(shards), removed)  # fmt: skip
    return [shard for shard in shards if shard.file not in kept]


def cache_progress(shards: list[ShardPlan], todo: list[ShardPlan]) -> tqdm:
    """Progress bar of images written, starting at those of the shards already complete."""
    total, left = (sum(shard.num_rows for shard in group) for group in (shards, todo))
    return tqdm(total=total, initial=total - left, unit="img", desc="cache")


def write_shard(
    out_dir: Path,
    shard: ShardPlan,
    encoded: Iterable[dict[str, np.ndarray]],
    dataset: ImageCaptionDataset,
    cond_shapes: dict[str, list[int]],
    bar: tqdm,
) -> None:
    """Write a shard from the encodings of its batches (in plan order), one row group each, under
    a temporary name that becomes the final one once the file is complete."""
    staging = out_dir / f"{shard.file}.partial"
    writer: pq.ParquetWriter | None = None
    try:
        for batch, arrays in zip(shard.batches, encoded, strict=True):
            columns = _shard_columns([dataset.rows[i] for i in batch], arrays, cond_shapes)
            if writer is None:
                schema = _schema(sorted(cond_shapes)).with_metadata({SHARD_KEY: shard.key})
                writer = pq.ParquetWriter(staging, schema)
            writer.write_table(pa.table(columns, schema=writer.schema))
            bar.update(len(batch))
    finally:
        if writer is not None:
            writer.close()
    os.replace(staging, out_dir / shard.file)


def finish_cache(
    out_dir: Path,
    shards: list[ShardPlan],
    dataset: ImageCaptionDataset,
    uncond: dict[str, np.ndarray],
    cond_shapes: dict[str, list[int]],
    *,
    model_id: str,
    dtype: str,
) -> Path:
    """Write uncond.parquet (from the encoding of ""), then manifest.json, atomically and last;
    bucket sizes and latent shapes are read back from the shards. Returns the manifest path."""
    uncond_columns = _cond_columns(uncond, cond_shapes)
    uncond_schema = _schema(sorted(cond_shapes), with_sample_columns=False)
    pq.write_table(pa.table(uncond_columns, schema=uncond_schema), out_dir / UNCOND)
    buckets: dict[str, dict[str, Any]] = {}
    for shard in shards:
        parquet = _open_parquet(out_dir / shard.file, _schema(sorted(cond_shapes)))
        table = parquet.read(columns=["bw", "bh", "latents_shape"])
        for bw, bh, shape in zip(*(table.column(name).to_pylist() for name in table.column_names)):
            bucket = buckets.setdefault(f"{bw}x{bh}", {"num_rows": 0, "latent_shape": shape})
            bucket["num_rows"] += 1
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model_id": model_id,
        "dtype": dtype,
        "num_rows": len(dataset),
        "shards": [{"file": shard.file, "num_rows": shard.num_rows} for shard in shards],
        "buckets": buckets,
        "cond_shapes": cond_shapes,
        "skipped": dict(dataset.skipped),
    }
    staging = out_dir / f"{MANIFEST}.partial"
    staging.write_text(json.dumps(manifest, indent=2))
    os.replace(staging, out_dir / MANIFEST)
    return out_dir / MANIFEST


def write_latent_cache(
    dataset: ImageCaptionDataset,
    out_dir: str | Path,
    *,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
    model_id: str,
    batch_size: int = 16,
    rows_per_shard: int = 1024,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Encode every sample of `dataset` into a cache folder in this process, resuming an
    unfinished one (`begin_cache`); returns the manifest path. `write_latent_cache_ray` in
    cache_ray.py writes the same files with Ray Data."""
    out_dir = Path(out_dir)
    shards = plan_shards(dataset, model_id=model_id, dtype=dtype, batch_size=batch_size,
                         rows_per_shard=rows_per_shard)  # fmt: skip
    todo = begin_cache(out_dir, shards, overwrite)
    cond_shapes: dict[str, list[int]] = {}
    with torch.inference_mode(), cache_progress(shards, todo) as bar:
        for shard in todo:
            batches = (load_batch(dataset, indices) for indices in shard.batches)
            encoded = (encode_batch(encode_images, encode_prompts, batch["caption"],
                                    batch["pixels"], dtype) for batch in batches)  # fmt: skip
            write_shard(out_dir, shard, encoded, dataset, cond_shapes, bar)
        uncond = encode_batch(encode_images, encode_prompts, [""], None, dtype)
    return finish_cache(out_dir, shards, dataset, uncond, cond_shapes, model_id=model_id,
                        dtype=dtype)  # fmt: skip


def _check_fields(path: Path, obj: Any, fields: dict[str, type]) -> None:
    """Raise naming `path` unless `obj` is a dict holding `fields` with those types."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is corrupt: expected a JSON object, got {type(obj).__name__}")
    for key, expected in fields.items():
        if not isinstance(obj.get(key), expected):
            raise ValueError(f"{path} is corrupt: field {key!r} missing or not {expected.__name__}")


def read_manifest(cache_dir: Path, model_id: str) -> dict[str, Any]:
    """Load manifest.json; refuses a corrupt one, another schema version or another model."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} not found: {cache_dir} is not a complete latent cache")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt: {e}") from e
    _check_fields(path, manifest, _MANIFEST_FIELDS)
    for shard in manifest["shards"]:
        _check_fields(path, shard, {"file": str, "num_rows": int})
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {manifest['schema_version']}, "
            f"this reader needs {SCHEMA_VERSION}; rebuild the cache"
        )
    if manifest["model_id"] != model_id:
        raise ValueError(
            f"{path}: cache built with model {manifest['model_id']!r}, this run "
            f"uses {model_id!r}; rebuild the cache for this model"
        )
    if manifest["dtype"] not in DTYPES:
        raise ValueError(f"{path} is corrupt: dtype {manifest['dtype']!r} not in {sorted(DTYPES)}")
    return manifest


def _open_parquet(path: Path, expected: pa.Schema) -> pq.ParquetFile:
    """Open a cache Parquet file and check its columns; errors name the file."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({e})") from e
    if not parquet.schema_arrow.equals(expected):
        raise ValueError(
            f"{path} has columns {parquet.schema_arrow.names}, expected {expected.names}"
        )
    return parquet


def _decode(
    table: pa.Table, column: str, row: int, shape: list[int], np_dtype: np.dtype, where: str
) -> torch.Tensor:
    """Decode one stored tensor cell to float32; a wrong byte count names the cell."""
    blob = table.column(column)[row].as_py()
    expected = int(np.prod(shape)) * np_dtype.itemsize
    if len(blob) != expected:
        raise ValueError(f"{where}, {column}: {len(blob)} bytes, {expected} for shape {shape}")
    return torch.from_numpy(np.frombuffer(blob, np_dtype).reshape(shape).astype("f4"))


def _read_uncond(cache_dir: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = cache_dir / UNCOND
    cond_shapes = manifest["cond_shapes"]
    try:
        table = _open_parquet(path, _schema(sorted(cond_shapes), with_sample_columns=False)).read()
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path} is corrupt ({e})") from e
    np_dtype = DTYPES[manifest["dtype"]]
    return {
        key: _decode(table, f"cond.{key}", 0, shape, np_dtype, str(path))[None]
        for key, shape in cond_shapes.items()
    }


def read_uncond(cache_dir: str | Path, model_id: str) -> dict[str, torch.Tensor]:
    """Cond of the empty prompt (batch of 1) from the manifest and uncond.parquet alone, without
    indexing the shards: what a learner or rollout worker needs from a cache it does not read."""
    cache_dir = Path(cache_dir)
    return _read_uncond(cache_dir, read_manifest(cache_dir, model_id))


class LatentCacheDataset(torch.utils.data.Dataset):
    """Cached samples: md5, caption, bw, bh, latents [C, h, w] and cond {key: tensor}."""

    def __init__(
        self, cache_dir: str | Path, *, model_id: str, max_samples: int | None = None
    ) -> None:
        if max_samples is not None and max_samples <= 0:
            raise ValueError(f"max_samples must be positive or None, got {max_samples}")
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir, model_id)
        self.cond_shapes: dict[str, list[int]] = self.manifest["cond_shapes"]
        self._np_dtype = DTYPES[self.manifest["dtype"]]
        self._files: dict[int, pq.ParquetFile] = {}
        # Decoded row groups, most recent last.
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self.rows: list[dict[str, Any]] = []
        self._where: list[tuple[int, int, int]] = []  # (shard, row group, row in group)
        for shard_index in range(len(self.manifest["shards"])):
            self._index_shard(shard_index)
        if len(self.rows) != self.manifest["num_rows"]:
            raise ValueError(
                f"{self.cache_dir / MANIFEST}: num_rows {self.manifest['num_rows']} "
                f"but the shards hold {len(self.rows)}"
            )
        self.rows, self._where = self.rows[:max_samples], self._where[:max_samples]

    def _path(self, shard_index: int) -> Path:
        return self.cache_dir / self.manifest["shards"][shard_index]["file"]

    def _index_shard(self, shard_index: int) -> None:
        path, parquet = self._path(shard_index), self._file(shard_index)
        num_rows = self.manifest["shards"][shard_index]["num_rows"]
        if parquet.metadata.num_rows != num_rows:
            raise ValueError(f"{path} holds {parquet.metadata.num_rows} rows, manifest {num_rows}")
        try:
            self.rows.extend(parquet.read(columns=["md5", "caption", "bw", "bh"]).to_pylist())
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{path} is corrupt ({e})") from e
        for group in range(parquet.num_row_groups):
            num_group_rows = parquet.metadata.row_group(group).num_rows
            self._where.extend((shard_index, group, row) for row in range(num_group_rows))

    def _file(self, shard_index: int) -> pq.ParquetFile:
        if shard_index not in self._files:
            schema = _schema(sorted(self.cond_shapes))
            self._files[shard_index] = _open_parquet(self._path(shard_index), schema)
        return self._files[shard_index]

    def _row_group(self, shard_index: int, group: int) -> pa.Table:
        key = (shard_index, group)
        if key not in self._groups:
            try:
                self._groups[key] = self._file(shard_index).read_row_group(group)
            except (OSError, pa.ArrowException) as e:
                path = self._path(shard_index)
                raise ValueError(f"{path}: row group {group} is corrupt ({e})") from e
            while len(self._groups) > 1 and self._cached_bytes() > _CACHED_GROUP_BYTES:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key]

    def _cached_bytes(self) -> int:
        return sum(table.nbytes for table in self._groups.values())

    def _tensor(
        self, table: pa.Table, column: str, row: int, shape: list[int], where: str
    ) -> torch.Tensor:
        return _decode(table, column, row, shape, self._np_dtype, where)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The (bw, bh) bucket of every index, for BucketBatchSampler."""
        return [(row["bw"], row["bh"]) for row in self.rows]

    def set_epoch(self, epoch: int) -> None:
        """No-op: cached samples carry no random augmentation (same API as the image dataset)."""

    def get(self, index: int, epoch: int = 0) -> dict[str, Any]:
        """Sample `index`; `epoch` is unused (cached samples are fixed)."""
        shard_index, group, row = self._where[index]
        table = self._row_group(shard_index, group)
        where = f"{self._path(shard_index)} row group {group} row {row}"
        shape = table.column("latents_shape")[row].as_py()
        cond = {
            key: self._tensor(table, f"cond.{key}", row, key_shape, where)
            for key, key_shape in self.cond_shapes.items()
        }
        latents = self._tensor(table, "latents", row, shape, where)
        return {**self.rows[index], "latents": latents, "cond": cond}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)

    def uncond_cond(self) -> dict[str, torch.Tensor]:
        """Cond of the empty prompt, batch of 1 (shared contract: batch-first tensors)."""
        return _read_uncond(self.cache_dir, self.manifest)

    def __getstate__(self) -> dict[str, Any]:
        # Open Parquet handles do not pickle; DataLoader workers reopen them lazily.
        return {**self.__dict__, "_files": {}, "_groups": OrderedDict()}

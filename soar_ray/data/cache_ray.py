"""The latent cache written with Ray Data: images decoded in CPU tasks, encoded in an actor pool.

Pipeline: one item per encode batch still to write (the plan of `plan_shards`) -> `_load` (CPU
tasks: decode, resize and crop the batch's images) -> `_Encoder` (a pool of `num_workers` actors,
each building its own encoders, one GPU each when the cluster has GPUs) -> this process, which
writes the shards in plan order (the pipeline keeps its input order) and the manifest last.
The plan, resuming, the shard writer and the manifest are cache.py's, so the files are byte for
byte those `write_latent_cache` writes with the same encoders on the same device. On a cluster
without GPUs the load and encode steps ask for the same resources, and Ray Data runs both in
the encoder actors (operator fusion).
"""

from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from soar_ray.data.cache import (
    ShardPlan,
    begin_cache,
    cache_progress,
    encode_batch,
    finish_cache,
    load_batch,
    plan_shards,
    write_shard,
)
from soar_ray.data.dataset import ImageCaptionDataset

Encoders = tuple[
    Callable[[torch.Tensor], torch.Tensor], Callable[[list[str]], dict[str, torch.Tensor]]
]
UNCOND_ITEM = {"shard": -1, "batch": 0}
"""The pipeline's last item: the encoding of the empty prompt "" (uncond.parquet)."""


def _load(item: dict[str, Any], dataset: ImageCaptionDataset, shards: list[ShardPlan]) -> dict:
    """Decode one encode batch: captions and pixels [B, 3, bh, bw] (none for the uncond item)."""
    if item["shard"] == UNCOND_ITEM["shard"]:
        return {**item, "caption": [""], "pixels": None, "error": None}
    try:
        batch = load_batch(dataset, shards[item["shard"]].batches[item["batch"]])
    except ValueError as exc:
        # A bad image is raised by the writing process when its batch is due: the shards before
        # it are written first and the message is the single-process writer's, file and line.
        return {**item, "caption": None, "pixels": None, "error": str(exc)}
    return {**item, "caption": batch["caption"], "pixels": batch["pixels"].numpy(), "error": None}


class _Encoder:
    """One encoder actor: `make_encoders()` runs once in it (loads the weights)."""

    def __init__(self, make_encoders: Callable[[], Encoders], dtype: str) -> None:
        self.encode_images, self.encode_prompts = make_encoders()
        self.dtype = dtype

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        out = {"shard": item["shard"], "batch": item["batch"], "error": item["error"]}
        if item["error"] is not None:
            return out
        # A copy: the pipeline hands out read-only views of its buffers.
        pixels = None if item["pixels"] is None else torch.tensor(item["pixels"])
        try:
            with torch.inference_mode():
                arrays = encode_batch(self.encode_images, self.encode_prompts,
                                      list(item["caption"]), pixels, self.dtype)  # fmt: skip
        except ValueError as exc:  # refused values (non-finite, out of range): as in _load
            return {**out, "error": str(exc)}
        return {**out, **arrays}


def _encodings(
    items: list[dict[str, int]],
    dataset: ImageCaptionDataset,
    shards: list[ShardPlan],
    make_encoders: Callable[[], Encoders],
    num_workers: int,
    dtype: str,
) -> Iterator[dict[str, Any]]:
    """The encoder output of every item, in the order of `items`."""
    num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    pipeline = ray.data.from_items(items)
    # The shards are written in plan order as batches arrive; Ray Data buffers early finishers.
    pipeline.context.execution_options.preserve_order = True
    pipeline = pipeline.map(_load, fn_kwargs={"dataset": dataset, "shards": shards}).map(
        _Encoder,
        fn_constructor_args=(make_encoders, dtype),
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_gpus=num_gpus,
    )
    yield from pipeline.iter_rows()


def _next_encoding(encodings: Iterator[dict[str, Any]], item: dict[str, int]) -> dict:
    """The arrays of the next encoder output, which must be that of `item`."""
    row = next(encodings)
    if (row["shard"], row["batch"]) != (item["shard"], item["batch"]):
        raise RuntimeError(f"Ray Data returned batch {row['shard'], row['batch']} before {item}")
    if row["error"] is not None:
        raise ValueError(row["error"])
    return {
        name: np.asarray(value)
        for name, value in row.items()
        if (name == "latents" or name.startswith("cond.")) and value is not None
    }


def write_latent_cache_ray(
    dataset: ImageCaptionDataset,
    out_dir: str | Path,
    *,
    make_encoders: Callable[[], Encoders],
    num_workers: int,
    model_id: str,
    batch_size: int = 16,
    rows_per_shard: int = 1024,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """`write_latent_cache` on the connected Ray cluster, with `num_workers` encoder actors that
    each call the picklable `make_encoders()` once for (encode_images, encode_prompts); resumes
    an unfinished cache the same way. Returns the manifest path."""
    if num_workers <= 0:
        raise ValueError(f"num_workers must be positive, got {num_workers}")
    out_dir = Path(out_dir)
    shards = plan_shards(dataset, model_id=model_id, dtype=dtype, batch_size=batch_size,
                         rows_per_shard=rows_per_shard)  # fmt: skip
    todo = begin_cache(out_dir, shards, overwrite)
    items = [{"shard": s.index, "batch": b} for s in todo for b in range(len(s.batches))]
    pipeline = _encodings([*items, UNCOND_ITEM], dataset, shards, make_encoders, num_workers,
                          dtype)  # fmt: skip
    cond_shapes: dict[str, list[int]] = {}
    # Closing the pipeline (an error stops the writing) stops its tasks and actors at once.
    with closing(pipeline) as encodings, cache_progress(shards, todo) as bar:
        for shard in todo:
            encoded = (_next_encoding(encodings, {"shard": shard.index, "batch": b})
                       for b in range(len(shard.batches)))  # fmt: skip
            write_shard(out_dir, shard, encoded, dataset, cond_shapes, bar)
        uncond = _next_encoding(encodings, UNCOND_ITEM)
    return finish_cache(out_dir, shards, dataset, uncond, cond_shapes, model_id=model_id,
                        dtype=dtype)  # fmt: skip

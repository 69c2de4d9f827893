"""Objects from a validated job config: the model, the training dataset and its sampler.

Every process that needs one (the driver, each learner, each rollout worker) builds it here, so
all of them agree on weights, data and batch order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from soar_ray.config import ConfigError, JobConfig
from soar_ray.data import (
    BucketBatchSampler,
    ImageCaptionDataset,
    LatentCacheDataset,
    make_synthetic_set,
)
from soar_ray.data.cache import read_uncond
from soar_ray.models import COMPONENTS, SD3Model, build_model
from soar_ray.models.sd3 import move
from soar_ray.workers.learner import Learner

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DATA_FIELDS = {"jsonl": "data.jsonl", "cache": "data.cache_dir", "synthetic": "data.synthetic"}
"""data.source -> the field a bad training row, image or cache file is reported under."""


def model_identity(job: JobConfig) -> str:
    """What a latent cache must have been encoded with: weights and prompt length."""
    weights = f"pretrained:{Path(job.model.pretrained).resolve()}" if job.model.pretrained else (
        f"preset:{job.model.preset}:seed{job.seed}"
    )  # fmt: skip
    return f"{weights}|t5_max_length={job.model.t5_max_length}"


def build_sd3(
    job: JobConfig,
    device: torch.device | str = "cpu",
    *,
    components: tuple[str, ...] | None = None,
) -> SD3Model:
    """The job's model: transformer in the training precision, frozen parts in their dtypes.

    Random presets are seeded with the job seed, so every rank builds identical weights. Also
    sets this process's TF32 matmuls from `deepspeed.allow_tf32` (GPU fp32 work only).
    """
    torch.backends.cuda.matmul.allow_tf32 = job.deepspeed.allow_tf32
    torch.backends.cudnn.allow_tf32 = job.deepspeed.allow_tf32
    source = {"pretrained": job.model.pretrained} if job.model.pretrained else {
        "preset": job.model.preset
    }  # fmt: skip
    kwargs = {"components": components} if components is not None else {}
    model = build_model(
        **source,
        **kwargs,
        transformer=job.model.transformer,
        device=device,
        dtype=DTYPES[job.deepspeed.precision],
        encoder_dtype=DTYPES[job.model.dtype],
        seed=job.seed,
        max_sequence_length=job.model.t5_max_length,
    )
    if model.vae is not None:
        move(model.vae, device, DTYPES[job.model.vae_dtype])
    return model


@contextmanager
def data_errors(job: JobConfig) -> Iterator[None]:
    """A bad training row, image or cache file becomes one ConfigError line naming the field."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{DATA_FIELDS[job.data.source]}: {exc}") from None


def build_dataset(job: JobConfig) -> ImageCaptionDataset | LatentCacheDataset:
    """The training set of `job.data.source`: synthetic (generated once), jsonl or cache; bad
    input is a ConfigError naming the field, the file and the line."""
    with data_errors(job):
        return _build_dataset(job)


def _build_dataset(job: JobConfig) -> ImageCaptionDataset | LatentCacheDataset:
    data = job.data
    if data.source == "cache":
        return LatentCacheDataset(
            data.cache_dir, model_id=model_identity(job), max_samples=data.max_samples
        )
    if data.source == "synthetic":
        synthetic = make_synthetic_set(
            job.synthetic_path,
            data.synthetic.num_images,
            seed=data.synthetic.seed,
            buckets=[tuple(r) for r in data.synthetic.resolutions],
        )
        jsonl_path, image_dir = synthetic.jsonl_path, synthetic.image_dir
    else:
        jsonl_path, image_dir = Path(data.jsonl), Path(data.image_dir)
    return ImageCaptionDataset(
        jsonl_path,
        image_dir,
        on_bad_sample=data.on_bad_sample,
        verify_images=data.verify_images,
        max_samples=data.max_samples,
        caption_key=data.caption_key,
        random_flip=data.flip,
        seed=job.seed,
    )


def build_sampler(
    job: JobConfig, dataset: ImageCaptionDataset | LatentCacheDataset, rank: int, world_size: int
) -> BucketBatchSampler:
    """Bucketed batches of `data.batch_size` for one data-parallel rank."""
    return BucketBatchSampler(
        dataset.buckets, job.data.batch_size, rank=rank, world_size=world_size, seed=job.seed
    )


def cache_uncond(job: JobConfig) -> dict[str, torch.Tensor] | None:
    """The cached encoding of "" when training from a latent cache (no text encoder needed)."""
    if job.data.source != "cache":
        return None
    return read_uncond(job.data.cache_dir, model_identity(job))


def learner_components(job: JobConfig) -> tuple[str, ...]:
    """What a learner must hold: the transformer alone unless it encodes raw images itself
    (colocated stages on jsonl/synthetic data) or renders the sample grids (no rollout workers)."""
    renders = job.logging.sample_every > 0 and job.cluster.num_rollout_workers == 0
    encodes = job.data.source != "cache" and any(
        stage.algorithm == "soar" and stage.mode == "colocated" for stage in job.stages
    )
    return COMPONENTS if renders or encodes else ("transformer",)


def learner_device(job: JobConfig) -> torch.device:
    """cuda (the one GPU Ray gave this actor) when learners hold GPUs, else cpu."""
    if job.cluster.gpus_per_learner > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "cluster.gpus_per_learner > 0 but this learner process sees no CUDA device"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_learner(
    job: JobConfig,
    model: SD3Model,
    *,
    rank: int = 0,
    world_size: int = 1,
    distributed: bool = True,
) -> Learner:
    """A learner rank on `model`: DeepSpeed engines when `distributed` (the process group must be
    up), else the in-process LocalEngine. `setup_stage` then builds a stage's engine and step."""
    all_reduce = all_reduce_sum if distributed and world_size > 1 else None
    return Learner(job, model, rank=rank, world_size=world_size, all_reduce=all_reduce,
                   distributed=distributed, uncond=cache_uncond(job))  # fmt: skip


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the learners' process group (moved to the backend's device and back)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else (
        torch.device("cpu")
    )  # fmt: skip
    reduced = tensor.to(device)
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)

"""Datasets, bucket sampler, latent cache, synthetic images and prompt sets."""

from soar_ray.data.cache import LatentCacheDataset, write_latent_cache
from soar_ray.data.dataset import ImageCaptionDataset, collate_samples
from soar_ray.data.prompts import Prompt, load_prompt_set
from soar_ray.data.sampler import BucketBatchSampler
from soar_ray.data.synthetic import SyntheticSet, make_synthetic_set

__all__ = [
    "BucketBatchSampler",
    "ImageCaptionDataset",
    "LatentCacheDataset",
    "Prompt",
    "SyntheticSet",
    "collate_samples",
    "load_prompt_set",
    "make_synthetic_set",
    "write_latent_cache",
]

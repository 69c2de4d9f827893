"""soar_ray: SOAR and Flow-GRPO post-training of rectified-flow text-to-image models on Ray."""

__version__ = "0.1.0"

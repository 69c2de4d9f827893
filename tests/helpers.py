"""Helpers more than one test file reads with."""

from pathlib import Path


def tensorboard_events(
    run_dir: Path,
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """(scalars: tag -> [(step, value)], images: tag -> [step]) of a run's TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}  # fmt: skip
    images = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    return scalars, images

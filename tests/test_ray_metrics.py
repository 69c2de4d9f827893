"""Ray metrics: MetricsLogger's `soar_ray_` gauges on the local node's Prometheus endpoint."""

import time

import torch

from soar_ray.metrics import MetricsLogger, ray_metric_name


def test_metric_names_are_prefixed_and_prometheus_safe():
    assert ray_metric_name("loss") == "soar_ray_loss"
    assert ray_metric_name("samples_per_s") == "soar_ray_samples_per_second"
    assert ray_metric_name("reward/ocr-v2") == "soar_ray_reward_ocr_v2"


def _read_job(ray_local, soar_metrics, job):
    """Per stage, the gauges of `job`: {stage: {name: value}}."""
    stages = {}
    for (name, job_tag, stage), value in soar_metrics(ray_local.metrics_url).items():
        if job_tag == job:
            stages.setdefault(stage, {})[name] = value
    return stages


def _wait_until(read, done, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not done(values := read()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return values


def test_logged_scalars_reach_the_metrics_endpoint(ray_local, soar_metrics, tmp_path):
    record = {
        "stage": "0-soar", "loss": 0.5, "loss_aux": torch.tensor(0.25), "samples_per_s": 12.0,
        "policy_version": 3, "staleness": 1, "checkpoint_seconds": 0.75,
        "note": "text", "resumed": True,
    }  # fmt: skip
    expected = {
        "soar_ray_step": 3.0, "soar_ray_loss": 0.5, "soar_ray_loss_aux": 0.25,
        "soar_ray_samples_per_second": 12.0, "soar_ray_policy_version": 3.0,
        "soar_ray_staleness": 1.0, "soar_ray_checkpoint_seconds": 0.75,
    }  # fmt: skip
    with MetricsLogger(tmp_path, tensorboard=False, ray_metrics=True, job_name="names") as logger:
        logger.log(3, record)
        seen = _wait_until(
            lambda: _read_job(ray_local, soar_metrics, "names"),
            lambda stages: stages.get("0-soar", {}).keys() >= expected.keys(),
        )
    assert seen == {"0-soar": expected}  # text and flags are not exported


def test_gauges_outlive_the_report_interval_and_follow_the_stage(ray_local, soar_metrics, tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, ray_metrics=True, job_name="alive") as logger:
        logger.log(7, {"stage": "0-soar", "loss": 0.5, "loss_aux": 0.25})
        _wait_until(lambda: _read_job(ray_local, soar_metrics, "alive"), bool)
        logger.log(1, {"stage": "1-soar", "loss": float("nan"), "loss_aux": 0.125})
        # Ray drops a gauge not exported for two report intervals (1 s each here): wait past an
        # export plus that.
        time.sleep(4.0)
        stages = _read_job(ray_local, soar_metrics, "alive")
    # The old stage's series are gone, the new one is still exported, a NaN loss is not.
    assert stages == {"1-soar": {"soar_ray_step": 1.0, "soar_ray_loss_aux": 0.125}}

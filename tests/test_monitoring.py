"""docker/monitoring/: the Grafana dashboard of the `soar_ray_` gauges, the Prometheus scrape
config and the KubeRay PodMonitor (against the Prometheus Operator's own v0.93.0 CRD schema,
vendored in tests/data/monitoring).

That the dashboard queries only gauges the code exports is checked on the metrics.jsonl rows of
real runs, mapped to gauge names as the code maps them: test_grpo_stage.py's SOAR -> GRPO chain
exports all but two, test_soar_stage.py's disaggregated SOAR run the rollout rate, and the
learner's own memory metric on a CUDA device the last (below)."""

import copy
import gzip
import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import ray
import torch
import yaml
from helpers import (
    MONITORING,
    dashboard,
    exported_gauges,
    not_exported,
    selected,
    strict,
)

from soar_ray.workers.learner import Learner

ROOT = Path(__file__).resolve().parents[1]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_every_panel_queries_soar_ray_gauges_of_the_selected_job_and_stage():
    board = dashboard()
    assert board["uid"] == "soar-ray"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "stage"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        # "All" must not match the reward pool's untagged series of the same names as the
        # epoch record's `reward_<name>_mean` (soar_ray/cluster/rewards.py).
        assert variable["includeAll"] and variable["allValue"] == ".+"
        assert variable["query"]["query"].startswith("label_values(ray_soar_ray_step")
    # Every $variable in use (`$1` is label_replace's capture group) is defined.
    used = set(re.findall(r"\$\{?([a-zA-Z_]\w*)", json.dumps(board)))
    assert {u for u in used if not u.startswith("__")} == variables.keys()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["type"] == "timeseries" and panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names, patterns = selected(expr)
            assert target["datasource"] == DATASOURCE and (names or patterns), expr
            assert all(n.startswith("ray_soar_ray_") for n in names | patterns), expr
            assert expr.count("{") == expr.count('job=~"$job", stage=~"$stage"'), expr
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
    # No two panels overlap on Grafana's 24-column grid.
    cells = [{(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
             for g in (p["gridPos"] for p in board["panels"])]  # fmt: skip
    assert all(max(x for x, _ in c) < 24 for c in cells)
    assert all(not a & b for a, b in itertools.combinations(cells, 2))


def test_selected_reads_names_and_patterns_not_label_values():
    assert selected('label_values(ray_soar_ray_step{job=~"$job"}, stage)') == (
        {"ray_soar_ray_step"}, set()
    )  # fmt: skip
    expr = ('label_replace({__name__=~"ray_soar_ray_reward_.+_mean", stage=~"$stage"}, "c", '
            '"$1", "__name__", "ray_soar_ray_(.+)_mean")')  # fmt: skip
    assert selected(expr) == (set(), {"ray_soar_ray_reward_.+_mean"})


def test_not_exported_names_what_a_run_lacks():
    rows = [{"step": 1, "time": 0.0, "stage": "0-soar", "loss": 0.5, "reward_ocr_mean": 0.25}]
    assert exported_gauges(rows) == {"ray_soar_ray_step", "ray_soar_ray_loss",
                                     "ray_soar_ray_reward_ocr_mean"}  # fmt: skip
    missing = not_exported(rows)
    assert "ray_soar_ray_staleness" in missing and "ray_soar_ray_loss" not in missing
    assert "ray_soar_ray_reward_.+_mean" not in missing  # reward_ocr_mean matches it
    assert "ray_soar_ray_reward_.+_mean" in not_exported([{"reward_mean": 1.0}])


def test_the_gpu_memory_panel_shows_what_a_gpu_learner_reports():
    # No GPU here: torch answers 0 for a CUDA device it never used, so the learner's own method
    # gives the name its GPU runs report.
    reported = Learner.memory_metrics(SimpleNamespace(device=torch.device("cuda", 0)))
    assert exported_gauges([reported]) == {"ray_soar_ray_gpu_peak_memory_gib"}
    [panel] = [p for p in dashboard()["panels"] if p["title"] == "Learner GPU peak memory"]
    assert selected(panel["targets"][0]["expr"]) == (exported_gauges([reported]), set())


def test_scrape_config_is_rays_own_scrape_job_keeping_the_job_label():
    config = yaml.safe_load((MONITORING / "prometheus" / "soar_ray_scrape.yaml").read_text())
    # The config Ray's `ray metrics launch-prometheus` runs, shipped in the ray package.
    rays = yaml.safe_load((Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" /
                           "export" / "prometheus" / "prometheus.yml").read_text())  # fmt: skip
    [job] = config["scrape_configs"]
    assert {**rays["scrape_configs"][0], "honor_labels": True} == job
    assert config["global"] == rays["global"]


def test_podmonitor_matches_the_operators_schema_and_a_typo_does_not():
    data = json.loads(gzip.decompress((ROOT / "tests" / "data" / "monitoring" /
                                       "podmonitors.v1.schema.json.gz").read_bytes()))  # fmt: skip
    assert (data["group"], data["kind"]) == ("monitoring.coreos.com", "PodMonitor")
    validator = jsonschema.Draft7Validator(strict(data["openAPIV3Schema"]))
    monitor = yaml.safe_load((MONITORING / "prometheus" / "soar_ray_podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert list(validator.iter_errors(monitor)) == []
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    # KubeRay labels every Ray pod so; the manifests in docker/kuberay run in that namespace.
    assert monitor["spec"]["selector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    typo = copy.deepcopy(monitor)
    endpoint = typo["spec"]["podMetricsEndpoints"][0]
    endpoint["honorLabel"] = endpoint.pop("honorLabels")
    assert any("honorLabel" in e.message for e in validator.iter_errors(typo))

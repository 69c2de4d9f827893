"""Helpers more than one test file reads with."""

import copy
import json
import re
from pathlib import Path

from soar_ray.metrics import ray_metric_name

MONITORING = Path(__file__).resolve().parents[1] / "docker" / "monitoring"
RAY_NAMESPACE = "ray_"
"""Ray's prefix in front of every custom metric on the Prometheus endpoint."""


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


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused: an object that lists its properties and
    neither allows others nor preserves unknown fields gets additionalProperties: false."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana" / "soar_ray_dashboard.json").read_text())


def queries(board: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    variables = [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])] + variables


def selected(expr: str) -> tuple[set[str], set[str]]:
    """The gauges an expression selects: names (before label matchers, or label_values' first
    argument), and `__name__=~` patterns."""
    patterns = set(re.findall(r'__name__=~"([^"]+)"', expr))
    # Quoted strings hold label values and regexes (label_replace's too), not metric names.
    bare = re.sub(r'"[^"]*"', '""', expr)
    names = re.findall(r"([a-zA-Z_:][\w:]*)\{", bare) + re.findall(r"label_values\((\w+)", bare)
    return set(names), patterns


def exported_gauges(rows: list[dict]) -> set[str]:
    """Prometheus names of the gauges metrics.jsonl rows were exported as: every numeric field
    but `time` (MetricsLogger), through the code's own name mapping."""
    return {RAY_NAMESPACE + ray_metric_name(key) for row in rows for key, value in row.items()
            if key != "time" and isinstance(value, (int, float)) and not isinstance(value, bool)}  # fmt: skip


def not_exported(rows: list[dict]) -> set[str]:
    """The dashboard's gauge names that no row exports, and its patterns that match none."""
    exported = exported_gauges(rows)
    missing = set()
    for expr in queries(dashboard()):
        names, patterns = selected(expr)
        missing |= names - exported
        missing |= {p for p in patterns if not any(re.fullmatch(p, n) for n in exported)}
    return missing

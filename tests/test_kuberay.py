"""docker/kuberay/ against KubeRay's own CRD schemas (v1.7.0, vendored in tests/data/kuberay):
every field known (as `kubectl apply --validate=strict` would have it, not pruned in silence),
token auth on, the dashboard not exposed, the pods running as the image's user, and the job's
entrypoint the command the README documents, on a job file that loads."""

import copy
import gzip
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import strict

from soar_ray.config import load_job

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "docker" / "kuberay"
SCHEMAS = Path(__file__).parent / "data" / "kuberay"


def validator(kind: str) -> jsonschema.Draft7Validator:
    data = json.loads(
        gzip.decompress((SCHEMAS / f"{kind.lower()}s.v1.schema.json.gz").read_bytes())
    )
    assert data["kind"] == kind and data["group"] == "ray.io"
    return jsonschema.Draft7Validator(strict(data["openAPIV3Schema"]))


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def errors(kind: str, document: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(kind).iter_errors(document)]  # fmt: skip


@pytest.mark.parametrize(("file", "kind"), [("rayjob.yaml", "RayJob"),
                                            ("raycluster.yaml", "RayCluster")])  # fmt: skip
def test_manifests_match_kuberays_schema_and_a_typo_does_not(file, kind):
    document = manifest(file)
    assert document["apiVersion"] == "ray.io/v1" and document["kind"] == kind
    assert errors(kind, document) == []
    spec = document["spec"]["rayClusterSpec"] if kind == "RayJob" else document["spec"]
    typo = copy.deepcopy(document)
    head = (typo["spec"]["rayClusterSpec"] if kind == "RayJob" else typo["spec"])["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")
    assert any("rayStartParam" in e for e in errors(kind, typo))
    # Token auth from the Secret, the dashboard inside the cluster, the image's user.
    assert spec["authOptions"] == {"mode": "token", "secretName": "soar-ray-auth-token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    uid = re.search(r"useradd --create-home --uid (\d+)", dockerfile)[1]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(uid)
        assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {"/shared"}
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "soar-ray-shared"
    assert manifest("shared-volume.yaml")["metadata"]["name"] == "soar-ray-shared"


def test_the_rayjob_runs_the_documented_command_on_a_job_that_loads():
    entrypoint = manifest("rayjob.yaml")["spec"]["entrypoint"]
    assert entrypoint in (ROOT / "README.md").read_text()
    program, command, job_file, *rest = shlex.split(entrypoint)
    assert (program, command) == ("soar-ray", "run")
    overrides = [value for flag, value in zip(rest[::2], rest[1::2]) if flag == "--set"]
    job = load_job(ROOT / job_file, overrides)
    assert Path(job.output_dir).is_absolute() and job.output_dir.startswith("/shared/")

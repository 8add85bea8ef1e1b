"""Kubernetes manifests: every built-in resource validates (strict, offline schemas of
kubernetes-validate) on the oldest and newest versions it ships, and the pieces agree with each other
and with the service: probes on real routes, a grace period longer than preStop + graceful drain,
env names that are real settings, selectors that match the pods, autoscaling on a gauge that
service/metrics.py really exposes."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Gauge

from service import metrics
from service.settings import Settings

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (dev extra) missing"
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
VERSIONS = ("1.29.0", "1.37.0")
BUILT_IN = ["namespace", "deployment", "service", "pdb", "hpa", "prometheus-adapter-rules"]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / f"{name}.yaml").read_text())


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(deployment)["env"]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", BUILT_IN)
def test_manifest_validates_strictly(name: str, version: str) -> None:
    kubernetes_validate.validate(load(name), version, strict=True)


def test_validator_rejects_a_broken_deployment() -> None:
    """The check above can fail: a probe with a port of the wrong type, an unknown field."""
    broken = copy.deepcopy(load("deployment"))
    container(broken)["livenessProbe"]["httpGet"]["port"] = ["http"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    unknown = copy.deepcopy(load("deployment"))
    container(unknown)["livenesProbe"] = container(unknown)["livenessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, VERSIONS[-1], strict=True)


def test_kustomizations_name_existing_files() -> None:
    for folder in (K8S, K8S / "keda"):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        for resource in kustomization["resources"]:
            assert (folder / resource).is_file(), f"{folder}: {resource}"
    assert "hpa.yaml" not in (K8S / "keda/kustomization.yaml").read_text()  # KEDA makes its own HPA


def test_probes_and_shutdown_timing() -> None:
    deployment = load("deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    command = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    graceful = float(env_of(deployment)["PREDGATE_GRACEFUL_TIMEOUT_S"])
    # readiness must have failed (and endpoints updated) before SIGTERM: preStop spans >= 2 probe periods
    assert pre_stop >= 2 * main["readinessProbe"]["periodSeconds"]
    # SIGKILL only after the pause, uvicorn's graceful timeout and the batcher drain (a few seconds)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + graceful + 10
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_resources_security_and_writable_paths() -> None:
    deployment = load("deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(main["resources"][kind])
    env = env_of(deployment)
    # one worker per requested core (each worker runs its own gate with one torch thread)
    assert int(env["PREDGATE_WORKERS"]) == int(main["resources"]["requests"]["cpu"])
    assert env["OMP_NUM_THREADS"] == "1"
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"--uid {pod['securityContext']['runAsUser']} " in dockerfile
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    assert any(env["PROMETHEUS_MULTIPROC_DIR"].startswith(m + "/") for m in mounts)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["http"] == int(env["PREDGATE_PORT"])


def test_env_names_are_real_settings() -> None:
    fields = {f"PREDGATE_{name.upper()}" for name in Settings.model_fields}
    for name in env_of(load("deployment")):
        if name.startswith("PREDGATE_"):
            assert name in fields, f"{name} is not a setting of service/settings.py"


def test_selectors_match_the_pods() -> None:
    deployment = load("deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert load("service")["spec"]["selector"].items() <= labels.items()
    assert load("pdb")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert load("service")["spec"]["ports"][0]["targetPort"] == "http"


def test_autoscaling_targets_real_gauges() -> None:
    deployment, hpa, pdb = load("deployment"), load("hpa"), load("pdb")
    scaled = yaml.safe_load((K8S / "keda/scaledobject.yaml").read_text())
    gauges = {m._name for m in vars(metrics).values() if isinstance(m, Gauge)}
    assert {"predgate_in_flight_requests", "predgate_queue_depth"} <= gauges
    name = deployment["metadata"]["name"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert scaled["spec"]["scaleTargetRef"]["name"] == name
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in gauges
    assert all(m["type"] != "Resource" for m in hpa["spec"]["metrics"])  # not CPU
    adapter = yaml.safe_load(load("prometheus-adapter-rules")["data"]["config.yaml"])
    assert adapter["rules"][0]["name"]["as"] == metric["pods"]["metric"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
    used = set(re.findall(r"\bpredgate_[a-z_]+", trigger["metadata"]["query"]))
    assert used and used <= gauges
    # the floor leaves a replica standing while the PDB lets one go
    for low in (hpa["spec"]["minReplicas"], scaled["spec"]["minReplicaCount"]):
        assert low - pdb["spec"]["maxUnavailable"] >= 2
    assert scaled["spec"]["minReplicaCount"] == hpa["spec"]["minReplicas"]

"""Deployment files: compose config validates, alert rules pass promtool, and every metric and label
the dashboard and the rules query exists in service/metrics.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from service import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/predgate.json"
RULES = ROOT / "deploy/prometheus/alerts.yml"
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
METRIC = re.compile(r"\b(predgate_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b(predgate_[a-z0-9_]+)\{([^}]*)\}")
BY = re.compile(r"\bby \(([^)]*)\)")


def exposed() -> dict[str, set[str]]:
    """Every sample name service/metrics.py can expose, with the metric's label names."""
    names: dict[str, set[str]] = {}
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "gauge": [""],
        "info": ["_info"],
    }
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels = set(value._labelnames)  # private, but the only record of the label names
            extra = {"le"} if value._type == "histogram" else set()
            for suffix in suffixes[value._type]:
                names[value._name + suffix] = labels | extra
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def rule_queries() -> list[str]:
    """The ``expr`` of every rule (the file is YAML; promtool validates its structure below)."""
    text = RULES.read_text()
    exprs = re.findall(r"expr: >\n((?:\s{10,}.*\n)+)|expr: (.+)\n", text)
    return [" ".join((folded or single).split()) for folded, single in exprs]


def test_dashboard_has_the_required_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for word in (
        "rejection rate",
        "per predicted class",
        "request rate",
        "latency per stage",
        "batch size",
        "drift",
    ):
        assert word in titles
    exprs = dashboard_queries()
    assert any(
        "histogram_quantile" in e and "predgate_stage_seconds_bucket" in e and "stage" in e for e in exprs
    )
    assert any('verdict="unknown"' in e and "by (class_name)" in e for e in exprs)


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_queried_metrics_and_labels_exist(source: str) -> None:
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    assert queries
    known = exposed()
    for expr in queries:
        used = METRIC.findall(expr)
        assert used, expr
        for name in used:
            assert name in known, f"{name} (in {expr!r}) is not exposed by service/metrics.py"
        for name, selector in SELECTOR.findall(expr):
            for label in re.findall(r"([a-z_]+)\s*=~?", selector):
                assert label in known[name], f"label {label} of {name} in {expr!r}"
        for group in BY.findall(expr):
            labels = {g.strip() for g in group.split(",")}
            assert any(labels <= known[name] for name in used), f"grouping by {labels} in {expr!r}"


def test_rules_name_the_rejection_spike_alert() -> None:
    queries = rule_queries()
    assert any("predgate:rejection_rate:5m > 2 * predgate:rejection_rate:1h" in q for q in queries)
    assert any("predgate_drift_ks_statistic" in q and "predgate_drift_ks_pvalue" in q for q in queries)


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
def test_promtool_checks_rules_and_config() -> None:
    rules = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], check=False, capture_output=True, text=True, timeout=60
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 8 rules found" in rules.stdout + rules.stderr
    config = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS_CONFIG)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert config.returncode == 0, config.stdout + config.stderr


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed"
)
def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    resolved = result.stdout
    assert "prom/prometheus" in resolved and "grafana/grafana" in resolved
    assert "/bundle" in resolved and "PREDGATE_BUNDLE: /bundle" in resolved
    for path in ("deploy/prometheus", "deploy/grafana/provisioning", "deploy/grafana/dashboards"):
        assert (ROOT / path).is_dir()


def test_dockerfile_essentials() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in text and "FROM ${PYTHON_IMAGE} AS base" in text
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert re.search(r"^USER predgate$", text, re.MULTILINE) and "HEALTHCHECK" in text and "/readyz" in text
    assert "AS gpu" in text and "onnxruntime-gpu" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "bundles", "runs"} <= set(ignored)

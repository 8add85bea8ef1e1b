"""docker-compose.yml with the balancer: the resolved config puts HAProxy on the published port in front
of a predgate service that publishes none (so ``--scale predgate=3`` works), the HAProxy config's
server-template names that service and port, and the replicas run with two workers on a read-only
root with a writable /tmp for the metrics directory."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed"
)


@pytest.fixture(scope="module")
def resolved() -> dict:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_balancer_in_front_of_scalable_replicas(resolved: dict) -> None:
    services = resolved["services"]
    predgate, balancer = services["predgate"], services["balancer"]
    assert "ports" not in predgate  # a fixed host port would stop --scale
    (port,) = balancer["ports"]
    published = port["published"] if isinstance(port, dict) else int(str(port).split(":")[0])
    assert int(published) == 8000
    assert "predgate" in balancer["depends_on"]
    assert any(
        v.rstrip(":ro").endswith("/usr/local/etc/haproxy") for v in map(str, balancer["volumes"])
    ) or any(isinstance(v, dict) and v.get("target") == "/usr/local/etc/haproxy" for v in balancer["volumes"])
    config = (ROOT / "deploy/haproxy/haproxy.cfg").read_text()
    (template,) = re.findall(r"^\s*server-template \S+ \d+ (\S+):(\d+) ", config, re.MULTILINE)
    assert template == ("predgate", str(predgate["environment"]["PREDGATE_PORT"]))
    (bind,) = re.findall(r"^\s*bind :(\d+)", config, re.MULTILINE)
    target = port["target"] if isinstance(port, dict) else int(str(port).split(":")[1])
    assert int(bind) == int(target)


def test_replicas_run_workers_on_a_read_only_root(resolved: dict) -> None:
    predgate = resolved["services"]["predgate"]
    env = predgate["environment"]
    assert int(env["PREDGATE_WORKERS"]) >= 2 and env["OMP_NUM_THREADS"] == "1"
    assert predgate["read_only"] is True
    assert any(env["PROMETHEUS_MULTIPROC_DIR"].startswith(t.split(":")[0] + "/") for t in predgate["tmpfs"])


def test_prometheus_scrapes_every_replica() -> None:
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "predgate"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["predgate"] and sd["type"] == "A" and sd["port"] == 8000

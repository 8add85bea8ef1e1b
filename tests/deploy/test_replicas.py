"""Three real replicas of the tiny bundle behind HAProxy (the shipped config), under load, one
SIGKILLed mid-run: no request is lost, because HAProxy retries what the dead replica held or
refused on the others. The same run without retries loses requests, so the first check can fail."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.replicas import HAPROXY_CONFIG, loopback_config, run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("haproxy") is None, reason="haproxy (Debian package; make system-deps) missing"
    ),
]


def test_loopback_config_is_the_shipped_one_with_local_servers(tmp_path: Path) -> None:
    text = loopback_config([1111, 2222, 3333], 4444, tmp_path / "s.sock")
    directives = [
        line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert not [d for d in directives if d[0] in ("server-template", "resolvers", "nameserver")]
    assert ["bind", "127.0.0.1:4444"] in directives
    assert re.findall(r"server r(\d) 127\.0\.0\.1:(\d+) check", text) == [
        ("0", "1111"),
        ("1", "2222"),
        ("2", "3333"),
    ]
    shipped = HAPROXY_CONFIG.read_text()
    for line in (
        "retry-on conn-failure empty-response response-timeout 503",
        "option redispatch 1",
        "retries 3",
    ):
        assert line in shipped and line in text
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(config)], check=False, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_one_replica_killed_under_load_loses_nothing(tiny_bundle: Path, tmp_path: Path) -> None:
    result = run(tiny_bundle, replicas=3, seconds=12, kill_after=4, concurrency=6, workdir=tmp_path)
    assert result["overall"]["requests"] > 60
    assert result["lost"] == 0, result["errors"]
    haproxy = result["haproxy"]
    assert haproxy["server_status_after"]["r1"].startswith("DOWN")
    assert haproxy["server_status_after"]["r0"] == haproxy["server_status_after"]["r2"] == "UP"
    assert haproxy["served_per_replica"]["r1"] > 0  # the victim was serving when it died
    assert haproxy["retries"] + haproxy["redispatches"] >= 1  # and some request had to go elsewhere
    assert result["after_kill"]["ok"] > 0.3 * result["overall"]["ok"]


@pytest.mark.slow  # the control run (no balancer retries) repeats the replica test's set-up: make test-all
def test_without_retries_the_kill_loses_requests(tiny_bundle: Path, tmp_path: Path) -> None:
    text = HAPROXY_CONFIG.read_text()
    no_retries = (
        text.replace("retries 3", "retries 0")
        .replace("option redispatch 1", "no option redispatch")
        .replace("retry-on conn-failure empty-response response-timeout 503", "retry-on none")
        .replace(" observe layer4 error-limit 1 on-error mark-down", "")
    )
    assert no_retries.count("retries 0") == 1 and "retry-on none" in no_retries
    result = run(
        tiny_bundle,
        replicas=3,
        seconds=8,
        kill_after=3,
        concurrency=6,
        workdir=tmp_path,
        haproxy_config=no_retries,
    )
    assert result["lost"] > 0, result

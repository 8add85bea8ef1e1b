"""End to end on loopback: ``python -m service.server`` under uvicorn, scraped by a real Prometheus.

After N requests whose verdicts Gate.run predicts, Prometheus's HTTP API must report the same number
of "unknown" verdicts. Also over real HTTP: a chunked body past the limit gets 413, and SIGTERM lets an
in-flight request finish before the process exits 0.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.bundle import Bundle
from models.gate import Gate
from tests.service.conftest import png_bytes

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
PAYLOAD_LIMIT = 4096


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
def server(tiny_bundle: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``(base URL, process)`` of a running service; its log is ``tmp_path / "server.log"``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREDGATE_")}
    env.update(
        PREDGATE_DEVICE="cpu",
        PREDGATE_MAX_QUEUE_DELAY_MS="300",
        PREDGATE_MAX_PAYLOAD_BYTES=str(PAYLOAD_LIMIT),
        PREDGATE_LOG_LEVEL="info",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed in the finally below
    command = [
        sys.executable,
        "-m",
        "service.server",
        "--bundle",
        str(tiny_bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: (
                process.poll() is None
                and httpx.get(f"{base}/readyz", timeout=2).status_code == 200
                or (process.poll() is not None and pytest.fail((tmp_path / "server.log").read_text()))
            ),
            90,
            "the service to become ready",
        )
        yield base, process
    finally:
        stop(process)
        log.close()


@pytest.fixture
def prometheus(server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("prometheus (Debian package prometheus) is not installed")
    target = server[0].removeprefix("http://")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: predgate\n    static_configs:\n      - targets: ['{target}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{base}/-/ready", timeout=2).status_code == 200, 60, "prometheus to start"
        )
        yield base
    finally:
        stop(process)
        log.close()


def query(prometheus: str, promql: str) -> float | None:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_counts_the_rejections(
    server: tuple[str, subprocess.Popen[bytes]],
    prometheus: str,
    gate: Gate,
    bundle: Bundle,
    sample_images: np.ndarray,
) -> None:
    base, _ = server
    images = sample_images[:20]
    out = gate.run(bundle.normalisation.apply(images))
    expected_unknown = int(out.reject.sum())

    def ask(i: int) -> str:
        files = {"file": (f"{i}.png", png_bytes(images[i]), "image/png")}
        response = httpx.post(f"{base}/predict", files=files, timeout=30)
        assert response.status_code == 200, response.text
        return str(response.json()["verdict"])

    threads: list[threading.Thread] = []
    verdicts: dict[int, str] = {}
    for i in range(len(images)):
        thread = threading.Thread(target=lambda i=i: verdicts.__setitem__(i, ask(i)))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(timeout=60)
    assert [verdicts[i] == "unknown" for i in range(len(images))] == list(out.reject)

    total = "sum(predgate_predictions_total)"
    wait_for(lambda: query(prometheus, total) == len(images), 30, "a scrape after the requests")
    unknown = query(prometheus, 'sum(predgate_predictions_total{verdict="unknown"})') or 0.0
    assert unknown == expected_unknown
    accepted = query(prometheus, 'sum(predgate_predictions_total{verdict="accept"})') or 0.0
    assert accepted == len(images) - expected_unknown
    requests = query(prometheus, 'sum(predgate_requests_total{route="/predict",status="200"})')
    assert requests == len(images)
    assert query(prometheus, "predgate_ready") == 1.0


def test_chunked_body_over_the_limit_and_graceful_sigterm(
    server: tuple[str, subprocess.Popen[bytes]],
    gate: Gate,
    bundle: Bundle,
    sample_images: np.ndarray,
    tmp_path: Path,
) -> None:
    base, process = server
    host, port = base.removeprefix("http://").split(":")

    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    chunks = (b"x" * 1024 for _ in range(8))  # no Content-Length: Transfer-Encoding chunked
    connection.request(
        "POST", "/predict", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True
    )
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["type"] == "payload_too_large"
    connection.close()

    # A request waiting in the batching queue (300 ms delay) when SIGTERM arrives is still answered.
    out = gate.run(bundle.normalisation.apply(sample_images[:1]))
    result: dict[str, Any] = {}

    def ask() -> None:
        files = {"file": ("0.png", png_bytes(sample_images[0]), "image/png")}
        result["response"] = httpx.post(f"{base}/predict", files=files, timeout=30)

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(0.15)
    process.send_signal(signal.SIGTERM)
    thread.join(timeout=30)
    answer = result["response"]
    assert answer.status_code == 200, answer.text
    assert answer.json()["verdict"] == ("unknown" if out.reject[0] else "accept")
    # uvicorn re-raises the signal after its graceful shutdown: the status says "ended by SIGTERM"
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    log = (tmp_path / "server.log").read_text()
    assert log.index("Application shutdown complete") > log.index("predgate stopped: batching queue drained")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)

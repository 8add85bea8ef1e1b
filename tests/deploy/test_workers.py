"""Two uvicorn workers in one server: /metrics (answered by whichever worker the kernel picks) counts
the requests of both, through prometheus-client's multiprocess mode. Checked against the per-process
value files the workers write, read directly: two workers each answered some requests, and every
scrape reports the sum. A stale file of an earlier run is wiped at start, and workers that exit
drop their live gauges."""

from __future__ import annotations

import base64
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from tests.deploy.processes import free_port, start_server, stop, wait_for, wait_ready
from tests.service.conftest import png_bytes

pytestmark = pytest.mark.integration

ROUND = 16
MAX_ROUNDS = 25
ROUTE_SAMPLE = re.compile(r'^predgate_requests_total\{route="/predict",status="200"\} (\S+)$', re.MULTILINE)


def per_process_requests(directory: Path) -> dict[int, float]:
    """``predgate_requests_total{/predict, 200}`` as each process's own value file holds it."""
    counts: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[-1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if name == "predgate_requests_total" and labels == {"route": "/predict", "status": "200"}:
                counts[pid] = counts.get(pid, 0.0) + value
    return counts


def test_two_workers_metrics_sum_both(tiny_bundle: Path, tmp_path: Path, sample_images: np.ndarray) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    stale = MmapedDict(str(directory / "counter_999999.db"))  # an earlier run's counts: must not be summed
    stale.write_value(
        mmap_key(
            "predgate_requests_total", "predgate_requests_total", ["route", "status"], ["/predict", "200"], ""
        ),
        1000.0,
        0.0,
    )
    stale.close()
    port, log = free_port(), tmp_path / "server.log"
    process = start_server(
        tiny_bundle, port, log, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base, log)
        # both workers ready: readiness as answered by many fresh connections
        wait_for(
            lambda: all(httpx.get(f"{base}/readyz", timeout=2).status_code == 200 for _ in range(10)),
            120,
            "both workers to be ready",
        )
        assert not (directory / "counter_999999.db").exists()
        bodies = [base64.b64encode(png_bytes(image)).decode() for image in sample_images[:ROUND]]

        def ask(body: str) -> int:
            with httpx.Client() as client:  # a new connection per request, so either worker may take it
                return client.post(
                    f"{base}/predict?signal_set=msp", json={"image": body}, timeout=30
                ).status_code

        # the kernel hands each connection to whichever worker accepts first: send rounds of
        # concurrent requests until both have answered some
        sent = 0
        workers: dict[int, float] = {}
        with ThreadPoolExecutor(8) as pool:
            for _ in range(MAX_ROUNDS):
                assert list(pool.map(ask, bodies)) == [200] * ROUND
                sent += ROUND
                workers = {pid: c for pid, c in per_process_requests(directory).items() if c > 0}
                if len(workers) == 2:
                    break
        assert len(workers) == 2, (workers, log.read_text())  # two processes answered, each in its own file
        # a request is counted once its answer is sent, so the last answers may be counted a moment later
        wait_for(lambda: sum(per_process_requests(directory).values()) == sent, 10, "every answer counted")
        workers = {pid: c for pid, c in per_process_requests(directory).items() if c > 0}
        assert sum(workers.values()) == sent
        for _ in range(6):  # each scrape lands on either worker: all report the total
            text = httpx.get(f"{base}/metrics", timeout=5).text
            (value,) = ROUTE_SAMPLE.findall(text)
            assert float(value) == sent
            assert "predgate_bundle_info{" in text and "predgate_ready 1.0" in text
            assert "predgate_in_flight_requests 0.0" in text
    finally:
        code = stop(process)
    assert code == 0, log.read_text()
    for pid in workers:  # exited workers dropped their live gauges (in flight, queue depth, ready)
        assert not list(directory.glob(f"gauge_live*_{pid}.db"))

"""Load against a real server process (``python -m service.server`` under uvicorn, loopback) over the
tiny bundle, through ``python -m bench.load``: every request gets exactly its own answer, the bounded
queue sheds with 503 + Retry-After instead of growing, nothing is lost; then SIGTERM under load drains
the requests in flight and loses none.

The queue limit is set below the concurrency (16 < 64) so that shedding happens on any machine; the
60 s run against the quick bundle is the documented command in docs/reliability.md.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import pytest

from bench import load
from tests.deploy.processes import free_port, start_server, stop, wait_ready

pytestmark = pytest.mark.integration

QUEUE_LIMIT = 16


@pytest.fixture(scope="module")
def server(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Popen[bytes], Path]]:
    port = free_port()
    log = tmp_path_factory.mktemp("load") / "server.log"
    process = start_server(
        tiny_bundle,
        port,
        log,
        env={"PREDGATE_QUEUE_LIMIT": str(QUEUE_LIMIT), "PREDGATE_MAX_QUEUE_DELAY_MS": "5"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base, log)
        yield base, process, log
    finally:
        stop(process)


def test_64_clients_for_10_s_get_their_own_answers_or_503_and_nothing_is_lost(
    server: tuple[str, Popen[bytes], Path], tmp_path: Path
) -> None:
    base, process, log = server
    out = tmp_path / "load.json"
    code = load.main(
        [
            "--url",
            base,
            "--concurrency",
            "64",
            "--seconds",
            "10",
            "--deadline-every",
            "5",
            "--deadline-s",
            "0.05",
            "--server-pid",
            str(process.pid),
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert process.poll() is None, log.read_text()[-3000:]
    assert code == 0 and result["lost"] == 0 and result["unexpected"] == 0, result["problems"]
    assert result["ok"] > 0 and result["shed"] > 0  # the queue refused work instead of growing
    assert result["queue_depth_max"] is not None and result["queue_depth_max"] <= QUEUE_LIMIT
    assert result["ok"] + result["shed"] + result["expired"] == result["requests"]
    assert set(result["statuses"]) <= {"200", "503", "504"}


def test_sigterm_under_load_drains_the_requests_in_flight(
    server: tuple[str, Popen[bytes], Path], tmp_path: Path
) -> None:
    """Runs last in this module: it ends the server."""
    base, process, log = server
    out = tmp_path / "sigterm.json"
    load.main(
        [
            "--url",
            base,
            "--concurrency",
            "32",
            "--seconds",
            "8",
            "--sigterm-after",
            "3",
            "--server-pid",
            str(process.pid),
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert result["lost"] == 0 and result["unexpected"] == 0, result["problems"]
    assert result["in_flight_at_sigterm"] > 0
    assert result["in_flight_answered"] == result["in_flight_at_sigterm"]
    text = log.read_text()
    assert text.index("Application shutdown complete") > text.index(
        "predgate stopped: batching queue drained"
    )

"""Abusive clients against a real uvicorn process on loopback: many connections that send nothing (or
stop halfway through their headers, or before their body) while ``/healthz`` must keep answering, and
a prediction still gets through. Then the same through the shipped nginx front (deploy/nginx), which
also disconnects the idle and stalled clients and caps the connections of one address.

The abusers connect from 127.0.0.2, the probes from 127.0.0.1 (all of 127/8 is loopback on Linux), as
in production where they come from different addresses. Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import httpx
import numpy as np
import pytest

from tests.deploy.processes import ROOT, free_port, start_server, stop, wait_for, wait_ready
from tests.service.conftest import png_bytes

pytestmark = pytest.mark.integration

IDLE = int(os.environ.get("PREDGATE_SLOW_IDLE", "200"))  # connections that send nothing (a longer run: more)
HALF_HEADERS = 20  # connections that stop in the middle of their headers (slowloris)
ABUSER = "127.0.0.2"
PROBE_S = 4.0
PROMPT_S = 1.0  # the slowest /healthz answer allowed (the machine may be busy)
NGINX = shutil.which("nginx") or (
    "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
)  # not on PATH
NGINX_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Popen[bytes]]]:
    port = free_port()
    log = tmp_path_factory.mktemp("slow") / "server.log"
    process = start_server(tiny_bundle, port, log, env={"PREDGATE_WARMUP": "false"})
    try:
        wait_ready(process, f"http://127.0.0.1:{port}", log)
        yield port, process
    finally:
        stop(process)


def open_abusers(port: int, idle: int, half: int, stalled_bodies: int = 0) -> list[socket.socket]:
    """``idle`` connections that send nothing, ``half`` that send half a request, ``stalled_bodies`` that
    send full headers announcing a body and none of it."""
    sockets = []
    payloads = [b""] * idle + [b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty"] * half
    payloads += [
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    ] * (stalled_bodies)
    for payload in payloads:
        sock = socket.socket()
        sock.bind((ABUSER, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        if payload:
            sock.sendall(payload)
        sockets.append(sock)
    return sockets


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end has closed (or reset) the connection; never blocks."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def probe_healthz(base: str, seconds: float) -> list[float]:
    """``/healthz`` on a fresh connection every 0.1 s for ``seconds``; the latencies (all must be 200)."""
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        answer = httpx.get(f"{base}/healthz", timeout=10)
        latencies.append(time.monotonic() - start)
        assert answer.status_code == 200, answer.text
        time.sleep(0.1)
    return latencies


def summary(latencies: list[float]) -> str:
    ms = np.array(latencies) * 1000
    return f"{len(ms)} /healthz answered 200, p50 {np.median(ms):.1f} ms, max {ms.max():.1f} ms"


def test_idle_and_half_sent_connections_do_not_starve_healthz(
    server: tuple[int, Popen[bytes]], sample_images: np.ndarray
) -> None:
    port, process = server
    base = f"http://127.0.0.1:{port}"
    abusers = open_abusers(port, IDLE, HALF_HEADERS)
    try:
        latencies = probe_healthz(base, PROBE_S)
        answer = httpx.post(
            f"{base}/predict",
            content=png_bytes(sample_images[0]),
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        still_open = sum(not closed_by_peer(s) for s in abusers)
        print(
            f"\nuvicorn alone, {IDLE} idle + {HALF_HEADERS} half-sent: "
            + summary(latencies)
            + f"; {still_open} of {len(abusers)} abusive connections still open after {PROBE_S:g} s"
        )
        assert max(latencies) < PROMPT_S, summary(latencies)
        assert process.poll() is None
    finally:
        for sock in abusers:
            sock.close()


@pytest.fixture(scope="module")
def nginx(server: tuple[int, Popen[bytes]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The shipped config with the test's ports and 1 s client timeouts, under a minimal nginx.conf."""
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian package nginx; make system-deps)")
    upstream, _ = server
    port = free_port()
    root = tmp_path_factory.mktemp("nginx")
    conf = (ROOT / "deploy/nginx/predgate.conf").read_text()
    conf = re.sub(r"listen 8080;", f"listen 127.0.0.1:{port};", conf)
    conf = re.sub(r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{upstream};", conf)
    conf = re.sub(r"(client_(header|body)_timeout) 10s;", rf"\1 {NGINX_TIMEOUT_S}s;", conf)
    assert f"listen 127.0.0.1:{port}" in conf and f"127.0.0.1:{upstream}" in conf
    (root / "predgate.conf").write_text(conf)
    temp = " ".join(
        f"{kind}_temp_path {root / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (root / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\ndaemon off;\npid {root / 'nginx.pid'};\n"
        f"error_log {root / 'error.log'} info;\n"
        f"events {{ worker_connections {4 * IDLE + 1024}; }}\n"
        f"http {{ access_log {root / 'access.log'}; {temp} include {root / 'predgate.conf'}; }}\n"
    )
    command = [NGINX, "-p", str(root), "-c", str(root / "nginx.conf")]
    checked = subprocess.run([*command, "-t"], check=False, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200, 20, "nginx"
        )
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_through_nginx_idle_clients_are_cut_and_one_address_is_capped(
    nginx: int, sample_images: np.ndarray
) -> None:
    base = f"http://127.0.0.1:{nginx}"
    shipped = (ROOT / "deploy/nginx/predgate.conf").read_text()
    limit = int(re.findall(r"limit_conn predgate_per_address (\d+);", shipped)[0])
    opened = time.monotonic()
    abusers = open_abusers(nginx, IDLE, HALF_HEADERS)
    stalled = open_abusers(nginx, 0, 0, stalled_bodies=limit)
    try:
        time.sleep(0.2)
        # the address has `limit` requests in progress (bodies awaited): its next one is refused, in JSON
        over = socket.create_connection(("127.0.0.1", nginx), source_address=(ABUSER, 0), timeout=5)
        over.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        refused = b""
        while chunk := over.recv(65536):
            refused += chunk
        over.close()
        assert refused.startswith(b"HTTP/1.1 429"), refused[:200]
        assert b"Retry-After: 1" in refused and b'"too_many_connections"' in refused
        # another address is served promptly throughout, predictions included
        latencies = probe_healthz(base, NGINX_TIMEOUT_S + 1.5)
        answer = httpx.post(
            f"{base}/predict",
            content=png_bytes(sample_images[1]),
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        assert answer.status_code == 200 and answer.json()["request_id"], answer.text
        # past the client timeouts nginx has disconnected every idle, half-sent and stalled client
        wait_for(lambda: all(closed_by_peer(s) for s in abusers + stalled), 5, "nginx to cut the abusers")
        cut_s = time.monotonic() - opened
        print(
            f"\nnginx, {IDLE} idle + {HALF_HEADERS} half-sent + {limit} stalled bodies: "
            + summary(latencies)
            + f"; all {len(abusers) + len(stalled)} closed by nginx when checked, "
            f"{cut_s:.1f} s after they connected "
            f"(client timeouts {NGINX_TIMEOUT_S} s)"
        )
        assert max(latencies) < PROMPT_S, summary(latencies)
    finally:
        for sock in abusers + stalled:
            sock.close()

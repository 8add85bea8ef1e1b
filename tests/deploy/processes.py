"""Real service processes on loopback for the deployment tests: start, wait until ready, stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """``check()`` until it is truthy; connection errors count as not yet."""
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


def start_server(
    bundle: Path, port: int, log: Path, *, workers: int = 1, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m service.server`` on 127.0.0.1:``port``, its output in ``log``; not yet ready."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREDGATE_", "PROMETHEUS_MULTIPROC"))}
    clean.update(PREDGATE_DEVICE="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PREDGATE_LOG_LEVEL="info")
    clean.update(env or {})
    command = [
        sys.executable,
        "-m",
        "service.server",
        "--bundle",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=clean, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(process: subprocess.Popen[bytes], base: str, log: Path, timeout: float = 120) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}:\n{log.read_text()}")
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200

    wait_for(ready, timeout, f"{base} to become ready")


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, wait; SIGKILL if it hangs. The exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return int(process.returncode)

"""``python -m bench.replicas``: N service replicas behind HAProxy on loopback, one killed mid-run.

Starts ``--replicas`` servers (``python -m service.server``, each on its own free port), then HAProxy
with the shipped ``deploy/haproxy/haproxy.cfg`` (its ``server-template`` replaced by the loopback
servers, its listener by a free port), and sends ``POST /predict`` from ``--concurrency`` client
threads back to back for ``--seconds``. After ``--kill-after`` seconds one replica gets SIGKILL (or
``--kill-signal TERM``): requests it held or that were sent to it are retried by HAProxy on another
replica (``retry-on``, ``option redispatch``). A request is *lost* when the client gets anything but
200. Reports throughput before and after the kill, latency percentiles, lost requests and HAProxy's
own retry and redispatch counters (from its stats socket).

    python -m bench.replicas --bundle bundles/fashion-mnist-quick --seconds 30 --kill-after 10
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import finish
from bench.serve import bundle_pngs, free_port

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CONFIG = ROOT / "deploy/haproxy/haproxy.cfg"
_TEMPLATE = re.compile(r"^(\s*)server-template .*$", re.MULTILINE)
_BIND = re.compile(r"^(\s*)bind :\d+\s*$", re.MULTILINE)
_SOCKET = re.compile(r"stats socket \S+")
_RESOLVERS = re.compile(r"^resolvers docker\n(?:[ \t]+.*\n)+", re.MULTILINE)


def loopback_config(
    ports: Sequence[int], listen_port: int, stats_socket: Path, text: str | None = None
) -> str:
    """The shipped HAProxy config with loopback servers ``r0..`` on ``ports`` and the listener on
    ``listen_port``; everything else (retries, checks, timeouts, balancing) stays as shipped."""
    text = HAPROXY_CONFIG.read_text() if text is None else text
    for pattern in (_TEMPLATE, _BIND, _SOCKET, _RESOLVERS):
        if len(pattern.findall(text)) != 1:
            raise ValueError(f"{HAPROXY_CONFIG}: expected one match of {pattern.pattern!r}")
    servers = "\n".join(f"    server r{i} 127.0.0.1:{port} check" for i, port in enumerate(ports))
    text = _TEMPLATE.sub(lambda _: servers, text)
    text = _BIND.sub(lambda m: f"{m.group(1)}bind 127.0.0.1:{listen_port}", text)
    text = _SOCKET.sub(f"stats socket {stats_socket}", text)
    return _RESOLVERS.sub("", text)


def haproxy_stats(stats_socket: Path) -> list[dict[str, str]]:
    """``show stat`` from HAProxy's stats socket, one dict per proxy/server row."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode().lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


def servers_up(stats_socket: Path) -> dict[str, str]:
    return {
        row["svname"]: row["status"]
        for row in haproxy_stats(stats_socket)
        if row["pxname"] == "predgate" and row["svname"] not in ("BACKEND", "FRONTEND")
    }


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, OSError):
            if check():
                return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Cluster:
    """The running replicas and balancer of :func:`cluster`."""

    url: str
    replicas: list[subprocess.Popen[bytes]]
    ports: list[int]
    haproxy: subprocess.Popen[bytes]
    stats_socket: Path
    logs: Path


def _stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextlib.contextmanager
def cluster(
    bundle: str | Path,
    n_replicas: int,
    workdir: Path,
    env: dict[str, str] | None = None,
    ready_timeout: float = 180,
    haproxy_config: str | None = None,
) -> Iterator[Cluster]:
    """``n_replicas`` servers of ``bundle`` behind HAProxy, all ready and UP; stopped on exit.
    ``haproxy_config`` replaces the shipped config's text (the tests' control without retries)."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise RuntimeError("haproxy not found (Debian package haproxy; make system-deps)")
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREDGATE_", "PROMETHEUS_MULTIPROC"))
    }
    base_env.update(PREDGATE_DEVICE="cpu", PREDGATE_LOG_LEVEL="warning", OMP_NUM_THREADS="1", **(env or {}))
    ports = [free_port() for _ in range(n_replicas)]
    replicas: list[subprocess.Popen[bytes]] = []
    balancer: subprocess.Popen[bytes] | None = None
    try:
        for i, port in enumerate(ports):
            with open(workdir / f"replica{i}.log", "wb") as log:
                replicas.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "service.server",
                            "--bundle",
                            str(bundle),
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(port),
                        ],
                        cwd=ROOT,
                        env=base_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for i, (port, process) in enumerate(zip(ports, replicas, strict=True)):

            def ready(port: int = port, process: subprocess.Popen[bytes] = process, i: int = i) -> bool:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"replica {i} exited:\n{(workdir / f'replica{i}.log').read_text()[-3000:]}"
                    )
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200

            _wait(ready, ready_timeout, f"replica {i} to be ready")
        listen, stats_socket = free_port(), workdir / "haproxy.sock"
        config = workdir / "haproxy.cfg"
        config.write_text(loopback_config(ports, listen, stats_socket, haproxy_config))
        with open(workdir / "haproxy.log", "wb") as log:
            balancer = subprocess.Popen(
                [haproxy, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
            )

        def all_up() -> bool:
            if balancer is not None and balancer.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{(workdir / 'haproxy.log').read_text()[-3000:]}")
            return stats_socket.exists() and set(servers_up(stats_socket).values()) == {"UP"}

        _wait(all_up, 30, "haproxy to see every replica UP")
        yield Cluster(f"http://127.0.0.1:{listen}", replicas, ports, balancer, stats_socket, workdir)
    finally:
        for process in replicas:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*replicas, *([balancer] if balancer is not None else [])]:
            _stop(process)


@dataclass
class LoadResult:
    """What the clients saw: one (start, seconds, status) per request; status -1 = no HTTP answer."""

    records: list[tuple[float, float, int]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


def load(
    url: str,
    images: Sequence[bytes],
    concurrency: int,
    seconds: float,
    *,
    signal_set: str | None = None,
    at: tuple[float, Any] | None = None,
    timeout: float = 60.0,
) -> tuple[LoadResult, float]:
    """``concurrency`` threads send PNGs back to back for ``seconds``; ``at = (t, fn)`` calls ``fn()``
    ``t`` seconds in. Returns the records and the clock's start (``time.perf_counter``)."""
    result, lock = LoadResult(), threading.Lock()
    params = {"signal_set": signal_set} if signal_set else None
    begin = time.perf_counter()
    stop_at = begin + seconds

    def worker(k: int) -> None:
        i = k
        with httpx.Client(timeout=timeout) as client:
            while (started := time.perf_counter()) < stop_at:
                try:
                    r = client.post(
                        f"{url}/predict",
                        content=images[i % len(images)],
                        headers={"content-type": "image/png"},
                        params=params,
                    )
                    status, error = r.status_code, None if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    status, error = -1, type(exc).__name__
                with lock:
                    result.records.append((started - begin, time.perf_counter() - started, status))
                    if error is not None:
                        result.errors[error] = result.errors.get(error, 0) + 1
                i += concurrency

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    if at is not None:
        delay, action = at
        time.sleep(max(0.0, begin + delay - time.perf_counter()))
        action()
    for t in threads:
        t.join()
    return result, begin


def _summary(records: Sequence[tuple[float, float, int]], span: float) -> dict[str, float]:
    ok = [seconds for _, seconds, status in records if status == 200]
    ms = 1000.0 * np.asarray(ok) if ok else np.asarray([np.nan])
    return {
        "requests": len(records),
        "ok": len(ok),
        "throughput_rps": len(ok) / span if span > 0 else float("nan"),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(np.max(ms)),
    }


def run(
    bundle: str | Path,
    *,
    replicas: int = 3,
    seconds: float = 30.0,
    kill_after: float | None = 10.0,
    kill_signal: str = "KILL",
    concurrency: int = 8,
    signal_set: str | None = None,
    workdir: Path | None = None,
    haproxy_config: str | None = None,
) -> dict[str, Any]:
    """The whole experiment (module doc); the result dict is what ``--out`` writes."""
    images, source = bundle_pngs(bundle, 64)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="predgate-replicas-")))
        c = stack.enter_context(cluster(bundle, replicas, workdir, haproxy_config=haproxy_config))
        victim = c.replicas[1 % replicas]
        killed: dict[str, Any] = {}

        def kill() -> None:
            killed["clock"] = time.perf_counter()
            victim.send_signal(getattr(signal, f"SIG{kill_signal}"))

        action = (kill_after, kill) if kill_after is not None else None
        result, begin = load(c.url, images, concurrency, seconds, signal_set=signal_set, at=action)
        rows = {row["svname"]: row for row in haproxy_stats(c.stats_socket) if row["pxname"] == "predgate"}
        backend = rows["BACKEND"]
        status_after = {name: row["status"] for name, row in rows.items() if name != "BACKEND"}
    records = result.records
    cut = killed["clock"] - begin if "clock" in killed else None
    out: dict[str, Any] = {
        "bundle": str(bundle),
        "images": source,
        "replicas": replicas,
        "concurrency": concurrency,
        "seconds": seconds,
        "signal_set": signal_set or "default",
        "kill_signal": kill_signal if kill_after is not None else None,
        "killed_replica": f"r{1 % replicas}" if kill_after is not None else None,
        "killed_at_s": cut,
        "lost": sum(1 for *_, status in records if status != 200),
        "errors": result.errors,
        "overall": _summary(records, seconds),
        "haproxy": {
            "retries": int(backend["wretr"] or 0),
            "redispatches": int(backend["wredis"] or 0),
            "server_status_after": status_after,
            "served_per_replica": {n: int(r["stot"] or 0) for n, r in rows.items() if n != "BACKEND"},
        },
        "cpu_cores": os.cpu_count(),
    }
    if cut is not None:
        out["before_kill"] = _summary([r for r in records if r[0] < cut], cut)
        out["after_kill"] = _summary([r for r in records if r[0] >= cut], seconds - cut)
    return out


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['replicas']} replicas behind HAProxy, {result['concurrency']} clients, "
        f"{result['seconds']:.0f} s, signal set {result['signal_set']}; {result['killed_replica']} got "
        f"SIG{result['kill_signal']} at {result['killed_at_s']:.1f} s"
        if result.get("killed_at_s") is not None
        else "no replica killed",
        f"{'phase':<12} {'requests':>9} {'ok':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for phase in ("before_kill", "after_kill", "overall"):
        if phase in result:
            s = result[phase]
            lines.append(
                f"{phase:<12} {s['requests']:>9} {s['ok']:>7} {s['throughput_rps']:>8.1f} "
                f"{s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} {s['max_ms']:>8.1f}"
            )
    h = result["haproxy"]
    lines.append(
        f"lost requests: {result['lost']} {result['errors'] or ''}; HAProxy retries {h['retries']}, "
        f"redispatches {h['redispatches']}; servers after: {h['server_status_after']}; "
        f"served: {h['served_per_replica']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--kill-after", type=float, default=10.0, help="seconds; negative: kill none")
    parser.add_argument("--kill-signal", default="KILL", choices=["KILL", "TERM"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--signal-set", default=None, help="default: the bundle's")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = run(
        args.bundle,
        replicas=args.replicas,
        seconds=args.seconds,
        kill_after=args.kill_after if args.kill_after >= 0 else None,
        kill_signal=args.kill_signal,
        concurrency=args.concurrency,
        signal_set=args.signal_set,
    )
    return finish(result, "bench.replicas", argv, args.out, render)


if __name__ == "__main__":
    sys.exit(main())

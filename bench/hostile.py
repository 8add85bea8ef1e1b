"""Send every hostile request of :mod:`bench.hostile_cases` to a running server and report.

    python -m bench.hostile --url http://127.0.0.1:8000 [--server-pid PID] [--json out.json]

For each case: the status, whether the answer is what a correct server sends (JSON 4xx naming the
problem, or 200 for odd but valid images), and the time. Between cases ``/healthz`` must answer, and
after each group a good image must still get its prediction: the server stays alive and keeps serving.
With ``--server-pid`` (a process on this machine) the server's resident memory is sampled throughout
and its peak (``VmHWM``) reported.

Only loopback addresses are targeted unless ``--allow-remote`` is given: this script sends
decompression bombs and megabyte bodies. Exit status 1 when any case fails or the server died.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

from bench.hostile_cases import Case, Target, build_cases, check_answer, encode, noise


@dataclass
class Outcome:
    name: str
    group: str
    status: int
    ok: bool
    problem: str | None
    error_type: str | None
    seconds: float


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def target_of(client: httpx.Client, max_payload_bytes: int, max_image_pixels: int) -> Target:
    """The catalogue's view of the server, from ``GET /v1/bundle``."""
    summary = client.get("/v1/bundle").raise_for_status().json()
    channels, height, _ = summary["serving"]["input_shape"]
    return Target(
        channels=int(channels),
        size=int(height),
        max_images_per_request=int(summary["serving"]["max_images_per_request"]),
        max_payload_bytes=max_payload_bytes,
        max_image_pixels=max_image_pixels,
        signal_sets=tuple(s["name"] for s in summary["signal_sets"]),
    )


def send_raw(host: str, port: int, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Write ``data`` on a fresh connection; the status and body of what comes back (0: none)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may close while we are still writing an oversized header
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        except OSError:
            pass
    reply = b"".join(chunks)
    try:
        status = int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    return status, reply.partition(b"\r\n\r\n")[2]


def send(client: httpx.Client, case: Case) -> tuple[int, bytes]:
    if case.raw is not None:
        url = urlsplit(str(client.base_url))
        return send_raw(url.hostname or "127.0.0.1", url.port or 80, case.raw)
    response = client.request(case.method, case.path, content=case.content or None, headers=case.headers)
    return response.status_code, response.content


class RssSampler:
    """Samples ``/proc/PID/status`` (VmRSS) every ``period`` s; ``peak_mib`` includes VmHWM."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid, self.period = pid, period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self, field: str) -> float | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.read("VmRSS")
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.period)

    def __enter__(self) -> Self:
        self.start_mib = self.read("VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.hwm_mib = self.read("VmHWM")

    @property
    def peak_mib(self) -> float | None:
        values = [*self.samples, *([self.hwm_mib] if getattr(self, "hwm_mib", None) else [])]
        return max(values) if values else None


def good_request(client: httpx.Client, target: Target) -> int:
    image = encode(noise(target.size, "L" if target.channels == 1 else "RGB", 42))
    return client.post("/predict", files={"file": ("good.png", image, "image/png")}).status_code


def run_suite(client: httpx.Client, cases: list[Case], target: Target) -> tuple[list[Outcome], list[str]]:
    """Every case in order; also the liveness problems seen between them."""
    outcomes: list[Outcome] = []
    alive_problems: list[str] = []
    last_group = None
    for case in cases:
        if last_group is not None and case.group != last_group:
            status = good_request(client, target)
            if status != 200:
                alive_problems.append(f"good image after group {last_group!r}: status {status}")
        last_group = case.group
        started = time.perf_counter()
        try:
            status, body = send(client, case)
            problem = check_answer(case, status, body)
        except (httpx.HTTPError, OSError) as exc:
            status, body, problem = 0, b"", f"no answer: {type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        try:
            error_type = json.loads(body)["error"]["type"] if 400 <= status < 500 else None
        except (ValueError, KeyError, TypeError):
            error_type = None
        outcomes.append(Outcome(case.name, case.group, status, problem is None, problem, error_type, seconds))
        try:
            if client.get("/healthz").status_code != 200:
                alive_problems.append(f"/healthz failed after {case.name}")
        except httpx.HTTPError as exc:
            alive_problems.append(f"/healthz unreachable after {case.name}: {exc}")
    if good_request(client, target) != 200:
        alive_problems.append("good image after the last case failed")
    return outcomes, alive_problems


def table(outcomes: list[Outcome]) -> str:
    lines = [f"{'case':40} {'group':13} {'status':>6} {'error type':24} {'ms':>8}  result"]
    for o in outcomes:
        result = "ok" if o.ok else f"FAIL: {o.problem}"
        lines.append(
            f"{o.name:40} {o.group:13} {o.status:>6} {o.error_type or '-':24} {1000 * o.seconds:8.1f}  "
            f"{result}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host")
    parser.add_argument("--server-pid", type=int, help="sample this local process's resident memory")
    parser.add_argument("--api-key", help="bearer token, when the server has keys")
    parser.add_argument(
        "--max-payload-bytes", type=int, default=8 * 1024 * 1024, help="the server's body cap"
    )
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="the server's pixel cap")
    parser.add_argument(
        "--json", type=Path, default=Path("reports/hostile.json"), help="where to write the results"
    )
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    host = urlsplit(args.url).hostname or ""
    if not is_loopback(host) and not args.allow_remote:
        print(
            f"refusing to send hostile input to {host!r}: not a loopback address (--allow-remote)",
            file=sys.stderr,
        )
        return 2
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as client:
        target = target_of(client, args.max_payload_bytes, args.max_image_pixels)
        cases = build_cases(target)
        sampler = RssSampler(args.server_pid) if args.server_pid else None
        if sampler:
            sampler.__enter__()
        try:
            outcomes, alive_problems = run_suite(client, cases, target)
        finally:
            if sampler:
                sampler.__exit__(None, None, None)
    print(table(outcomes))
    failed = [o for o in outcomes if not o.ok]
    server_errors = [o for o in outcomes if o.status >= 500]
    summary: dict[str, Any] = {
        "url": args.url,
        "kinds": len(outcomes),
        "passed": len(outcomes) - len(failed),
        "failed": len(failed),
        "server_errors": len(server_errors),
        "statuses": {
            str(s): sum(o.status == s for o in outcomes) for s in sorted({o.status for o in outcomes})
        },
        "alive_problems": alive_problems,
        "rss_start_mib": getattr(sampler, "start_mib", None),
        "rss_peak_mib": sampler.peak_mib if sampler else None,
        "cases": [asdict(o) for o in outcomes],
    }
    print(
        f"\n{summary['kinds']} kinds: {summary['passed']} as expected, {summary['failed']} not, "
        f"{summary['server_errors']} 5xx; statuses {summary['statuses']}; liveness problems: "
        f"{len(alive_problems)}"
    )
    if sampler:
        print(
            f"server RSS: {summary['rss_start_mib']:.0f} MiB at start, peak {summary['rss_peak_mib']:.0f} MiB"
        )
    for problem in alive_problems:
        print("  " + problem)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    return 1 if failed or alive_problems else 0


if __name__ == "__main__":
    sys.exit(main())

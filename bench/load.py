"""``python -m bench.load``: closed-loop HTTP load on a running server, checking every answer.

    python -m bench.load --url http://127.0.0.1:8000 --concurrency 64 --seconds 60 --json reports/load.json

``--concurrency`` asyncio workers (one httpx connection each) send ``POST /predict`` (a raw PNG body of
the served input size) back to back for ``--seconds``. Every request carries its own ``X-Request-ID``;
an answer counts only when it is *its own*: the ``X-Request-ID`` response header (and, for a 200, the
body's ``request_id``) must name the request that was sent. Answers are classified:

- ``ok``: 200 with the right id;
- ``shed``: 503 ``queue_full`` with ``Retry-After`` (the bounded queue refusing instead of growing);
  the worker waits ``--backoff-s`` before its next request;
- ``expired``: 504 ``deadline_exceeded``, only for requests sent with ``X-Request-Timeout``
  (``--deadline-every K --deadline-s S``: every K-th request sent allows S seconds);
- ``unexpected``: anything else (a 5xx, a 503 without Retry-After, a 4xx, a mismatched id);
- ``lost``: no HTTP answer at all (connection reset, timeout, protocol error).

With ``--sigterm-after S --server-pid PID`` the server gets SIGTERM S seconds in: requests in flight
at that moment must still be answered (graceful drain), and requests sent afterwards either get an
answer or find the server gone (connection refused or closed before any answer: ``refused``, not
lost; the worker then stops). A request that could not even connect never left the client, so after
SIGTERM it is refused however early it was started. ``/metrics`` is sampled for the queue depth
throughout. Exit status 1 when anything was lost or unexpected. Loopback only unless
``--allow-remote``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from bench.common import finish
from bench.hostile import RssSampler, is_loopback

SHED_TYPES = frozenset({"queue_full"})
_QUEUE_DEPTH = re.compile(r"^predgate_queue_depth(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.MULTILINE)


@dataclass
class Outcome:
    kind: str  # ok | shed | expired | unexpected | lost | refused
    status: int | None
    seconds: float
    started: float  # on the run's clock
    detail: str | None = None
    reached: bool = True  # False: no connection could be made, the request never left the client


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    depths: list[float] = field(default_factory=list)
    sigterm_at: float | None = None


def pngs(shape: list[int], n: int, seed: int = 0) -> list[bytes]:
    """``n`` random-pixel PNGs of ``shape`` (C x H x W)."""
    from PIL import Image

    c, h, w = shape
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def classify(response: httpx.Response, request_id: str, with_deadline: bool) -> tuple[str, str | None]:
    """The outcome kind of one HTTP answer (see the module docstring) and what was wrong, if anything."""
    answered = response.headers.get("x-request-id")
    if answered != request_id:
        return "unexpected", f"X-Request-ID {answered!r} answers request {request_id!r}"
    try:
        body = response.json()
    except ValueError:
        return "unexpected", f"{response.status_code} with a body that is not JSON"
    if response.status_code == 200:
        if body.get("request_id") != request_id:
            return "unexpected", f"body request_id {body.get('request_id')!r} answers request {request_id!r}"
        return "ok", None
    error = (body.get("error") or {}).get("type") if isinstance(body, dict) else None
    if response.status_code == 503 and error in SHED_TYPES and response.headers.get("retry-after"):
        return "shed", None
    if response.status_code == 504 and error == "deadline_exceeded" and with_deadline:
        return "expired", None
    return "unexpected", f"{response.status_code} {error}: {response.text[:200]}"


async def worker(
    index: int,
    client: httpx.AsyncClient,
    images: list[bytes],
    run: Run,
    clock: dict[str, float],
    args: argparse.Namespace,
) -> None:
    loop = asyncio.get_running_loop()
    sequence = 0
    while loop.time() < clock["end"]:
        sequence += 1
        clock["sent"] += 1
        request_id = f"load-{index}-{sequence}"
        headers = {"content-type": "image/png", "x-request-id": request_id}
        with_deadline = bool(args.deadline_every) and clock["sent"] % args.deadline_every == 0
        if with_deadline:
            headers["x-request-timeout"] = str(args.deadline_s)
        if args.api_key:
            headers["authorization"] = f"Bearer {args.api_key}"
        started = loop.time()
        try:
            response = await client.post("/predict", content=images[sequence % len(images)], headers=headers)
        except httpx.HTTPError as exc:
            now = loop.time()
            # A connection that could not be made carried no request: after SIGTERM that is the server
            # refusing new work, however early the request was started. Any other failure counts from
            # when the request was sent: sent before SIGTERM and unanswered is lost.
            never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            since = (now if never_sent else started) - clock["begin"]
            after_sigterm = run.sigterm_at is not None and since >= run.sigterm_at
            kind = "refused" if after_sigterm else "lost"
            detail = f"{type(exc).__name__}: {exc}"
            run.outcomes.append(
                Outcome(kind, None, now - started, started - clock["begin"], detail, not never_sent)
            )
            if after_sigterm:
                return  # the server is going away: this client stops
            continue
        seconds = loop.time() - started
        kind, detail = classify(response, request_id, with_deadline)
        run.outcomes.append(Outcome(kind, response.status_code, seconds, started - clock["begin"], detail))
        if kind == "shed":
            await asyncio.sleep(args.backoff_s)


async def sample_depth(client: httpx.AsyncClient, run: Run, clock: dict[str, float]) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < clock["end"]:
        try:
            text = (await client.get("/metrics", timeout=5)).text
            match = _QUEUE_DEPTH.search(text)
            if match:
                run.depths.append(float(match.group(1)))
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)


async def send_sigterm(pid: int, after: float, run: Run, clock: dict[str, float]) -> None:
    await asyncio.sleep(after)
    run.sigterm_at = asyncio.get_running_loop().time() - clock["begin"]
    os.kill(pid, signal.SIGTERM)


async def drive(args: argparse.Namespace) -> tuple[Run, float, dict[str, Any]]:
    limits = httpx.Limits(
        max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2
    )
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits) as client:
        summary = (await client.get("/v1/bundle")).raise_for_status().json()
        images = pngs(list(summary["input_shape"]), 16)
        run = Run()
        loop = asyncio.get_running_loop()
        clock = {"begin": loop.time(), "sent": 0}
        clock["end"] = clock["begin"] + args.seconds
        tasks = [
            asyncio.create_task(worker(i, client, images, run, clock, args)) for i in range(args.concurrency)
        ]
        tasks.append(asyncio.create_task(sample_depth(client, run, clock)))
        if args.sigterm_after is not None:
            tasks.append(asyncio.create_task(send_sigterm(args.server_pid, args.sigterm_after, run, clock)))
        await asyncio.gather(*tasks)
        wall = loop.time() - clock["begin"]
    return run, wall, summary


def percentiles_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ms = 1000.0 * np.asarray(values)
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
    }


def summarise(run: Run, wall: float, args: argparse.Namespace, summary: dict[str, Any]) -> dict[str, Any]:
    kinds = Counter(o.kind for o in run.outcomes)
    ok = [o.seconds for o in run.outcomes if o.kind == "ok"]
    result: dict[str, Any] = {
        "url": args.url,
        "bundle_id": summary.get("bundle_id"),
        "signal_set": summary.get("serving", {}).get("signal_set"),
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "wall_seconds": wall,
        "requests": len(run.outcomes),
        **{kind: kinds.get(kind, 0) for kind in ("ok", "shed", "expired", "unexpected", "lost", "refused")},
        "with_deadline": args.deadline_every
        and f"every {args.deadline_every}th request: {args.deadline_s:g} s",
        "statuses": dict(Counter(str(o.status) for o in run.outcomes)),
        "throughput_ok_per_s": len(ok) / wall if wall > 0 else None,
        "latency_ok_ms": percentiles_ms(ok),
        "latency_shed_ms": percentiles_ms([o.seconds for o in run.outcomes if o.kind == "shed"]),
        "queue_depth_max": max(run.depths) if run.depths else None,
        "queue_depth_samples": len(run.depths),
        "problems": [asdict(o) for o in run.outcomes if o.kind in ("unexpected", "lost")][:50],
    }
    if run.sigterm_at is not None:
        in_flight = [
            o for o in run.outcomes if o.reached and o.started < run.sigterm_at < o.started + o.seconds
        ]
        result["sigterm_at_s"] = run.sigterm_at
        result["in_flight_at_sigterm"] = len(in_flight)
        result["in_flight_answered"] = sum(1 for o in in_flight if o.status is not None)
        result["answered_after_sigterm"] = sum(
            1 for o in run.outcomes if o.status is not None and o.started >= run.sigterm_at
        )
    return result


def render(result: dict[str, Any]) -> str:
    ok, shed = result["latency_ok_ms"], result["latency_shed_ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [
        ("concurrency", str(result["concurrency"])),
        ("seconds", f"{result['wall_seconds']:.1f}"),
        ("requests", str(result["requests"])),
        ("ok (200, own id)", str(result["ok"])),
        ("shed (503 + Retry-After)", str(result["shed"])),
        ("expired (504 deadline)", str(result["expired"])),
        ("unexpected", str(result["unexpected"])),
        ("lost", str(result["lost"])),
        ("ok per second", f"{result['throughput_ok_per_s']:.1f}"),
        (
            "ok latency p50 / p90 / p99 / max ms",
            f"{ms(ok['p50'])} / {ms(ok['p90'])} / {ms(ok['p99'])} / {ms(ok['max'])}",
        ),
        ("shed latency p50 / p99 ms", f"{ms(shed['p50'])} / {ms(shed['p99'])}"),
        (
            "queue depth max (sampled)",
            "-" if result["queue_depth_max"] is None else f"{result['queue_depth_max']:.0f}",
        ),
    ]
    if "sigterm_at_s" in result:
        rows += [
            ("SIGTERM at s", f"{result['sigterm_at_s']:.1f}"),
            (
                "in flight at SIGTERM / answered",
                f"{result['in_flight_at_sigterm']} / {result['in_flight_answered']}",
            ),
            ("answered after SIGTERM / refused", f"{result['answered_after_sigterm']} / {result['refused']}"),
        ]
    if result.get("rss_peak_mib") is not None:
        rows.append(
            ("server RSS start / peak MiB", f"{result['rss_start_mib']:.0f} / {result['rss_peak_mib']:.0f}")
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    for problem in result["problems"][:10]:
        lines.append(f"  problem: {problem['kind']} {problem['status']} {problem['detail']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of a running server")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    parser.add_argument("--backoff-s", type=float, default=0.05, help="pause after a 503 (s)")
    parser.add_argument(
        "--deadline-every", type=int, default=0, help="every K-th request sends X-Request-Timeout"
    )
    parser.add_argument("--deadline-s", type=float, default=0.05, help="its X-Request-Timeout (s)")
    parser.add_argument("--api-key")
    parser.add_argument(
        "--server-pid", type=int, help="the server's pid on this machine: RSS and --sigterm-after"
    )
    parser.add_argument("--sigterm-after", type=float, help="send the server SIGTERM after this many seconds")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--allow-remote", action="store_true")
    args = parser.parse_args(argv)
    host = urlsplit(args.url).hostname or ""
    if not args.allow_remote and not is_loopback(host):
        print(f"python -m bench.load: {host} is not a loopback address (use --allow-remote)", file=sys.stderr)
        return 2
    if args.sigterm_after is not None and args.server_pid is None:
        parser.error("--sigterm-after needs --server-pid")
    sampler = (
        RssSampler(args.server_pid, period=0.25) if args.server_pid and args.sigterm_after is None else None
    )
    started = time.time()
    if sampler is not None:
        with sampler:
            run, wall, summary = asyncio.run(drive(args))
    else:
        run, wall, summary = asyncio.run(drive(args))
    result = summarise(run, wall, args, summary)
    result["started"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started))
    if sampler is not None:
        result["rss_start_mib"], result["rss_peak_mib"] = sampler.start_mib, sampler.peak_mib
    finish(result, "bench.load", argv, args.json, render)
    return 1 if result["lost"] or result["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())

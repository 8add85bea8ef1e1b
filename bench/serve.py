"""``python -m bench.serve``: HTTP load on the prediction service, with dynamic batching on and off.

With ``--bundle`` it starts its own servers (``python -m service.server`` on 127.0.0.1 at a free
port), one with the default ``max_batch_size`` and one with ``PREDGATE_MAX_BATCH_SIZE=1``, so the two
differ only in batching; with ``--url`` it loads a server that is already running. At each
concurrency level a fixed number of client threads send PNG images to ``POST /predict`` (raw
``image/png`` body) back to back, for a bounded number of requests and a bounded time, after a short
untimed warm-up. Latency is per request as the client sees it; throughput is successful requests over
the level's wall time. The client runs on the same machine as the server and takes CPU from it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import finish
from bench.gate import sample_images
from models.bundle import load_bundle
from models.progress import maybe_tqdm, progress_wanted

DEFAULT_CONCURRENCY = (1, 8, 32)
# "default" sends no signal_set (the server's default, normally the bundle's); anything else is
# passed as the signal_set query parameter.
DEFAULT_SIGNAL_SETS = ("default", "msp")
MODES = {"batched": {}, "unbatched": {"PREDGATE_MAX_BATCH_SIZE": "1"}}


# ------------------------------------------------------------------------------------------ images
def png_bytes(images: np.ndarray) -> list[bytes]:
    """Encode ``N x H x W x C`` uint8 images (C = 1 or 3) as PNG files."""
    from PIL import Image

    out = []
    for image in images:
        mode = "L" if image.shape[-1] == 1 else "RGB"
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def bundle_pngs(bundle_path: str | Path, n: int) -> tuple[list[bytes], str]:
    """PNGs of the bundle's val images (random pixels when its data cannot be reloaded)."""
    images, source = sample_images(load_bundle(bundle_path), n)
    return png_bytes(images), source


def url_pngs(url: str, n: int, seed: int = 0) -> tuple[list[bytes], str]:
    """Random-pixel PNGs of the input shape a running server reports (no bundle files at hand)."""
    c, h, w = httpx.get(f"{url}/v1/bundle", timeout=30).raise_for_status().json()["input_shape"]
    rng = np.random.default_rng(seed)
    return png_bytes(rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)), "random pixels"


# ------------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(
    bundle_path: str | Path, env: dict[str, str], threads: int | None = None, ready_timeout: float = 180.0
) -> Iterator[str]:
    """Start ``python -m service.server`` on a free loopback port, yield its URL once ``/readyz``
    answers 200, and stop it with SIGTERM (then SIGKILL after 30 s) on exit."""
    port = free_port()
    child_env = {**os.environ, "PREDGATE_LOG_LEVEL": "warning", **env}
    if threads is not None:
        child_env["OMP_NUM_THREADS"] = str(threads)
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.server",
                "--bundle",
                str(bundle_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"server not ready after {ready_timeout:.0f} s:\n{log.read()[-3000:]}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------------------------------ load
def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_level(
    url: str,
    images: Sequence[bytes],
    concurrency: int,
    n_requests: int,
    *,
    signal_set: str | None = None,
    max_seconds: float = 60.0,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """``concurrency`` threads send ``n_requests`` in all (fewer if ``max_seconds`` runs out).

    Returns latency percentiles (ms) of the successful requests, throughput (successful requests per
    second of wall time), error counts and the mean gate batch size the server reports.
    """
    params = {"signal_set": signal_set} if signal_set else None
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: dict[str, int] = {}
    clock = {"begin": 0.0, "deadline": 0.0}

    def go() -> None:  # runs once, when every client is connected-ready: the level's clock starts here
        clock["begin"] = time.perf_counter()
        clock["deadline"] = clock["begin"] + max_seconds

    start_line = threading.Barrier(concurrency, action=go)

    def worker() -> None:
        with httpx.Client(timeout=timeout) as client:
            start_line.wait()
            while True:
                i = next(counter)
                if i >= n_requests or time.perf_counter() > clock["deadline"]:
                    return
                started = time.perf_counter()
                try:
                    r = client.post(
                        f"{url}/predict",
                        content=images[i % len(images)],
                        headers={"content-type": "image/png"},
                        params=params,
                    )
                    elapsed = time.perf_counter() - started
                    if r.status_code == 200:
                        size = int(r.json().get("batch_size", 0))
                        with lock:
                            latencies.append(elapsed)
                            batch_sizes.append(size)
                        continue
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                with lock:
                    errors[key] = errors.get(key, 0) + 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - clock["begin"]
    ms = [1000.0 * v for v in latencies]
    return {
        "concurrency": concurrency,
        "signal_set": signal_set or "default",
        "requests_ok": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall > 0 else float("nan"),
        "p50_ms": _percentile(ms, 50),
        "p95_ms": _percentile(ms, 95),
        "p99_ms": _percentile(ms, 99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "mean_batch_size": statistics.fmean(batch_sizes) if batch_sizes else float("nan"),
    }


def load_server(
    url: str,
    images: Sequence[bytes],
    concurrency: Sequence[int],
    n_requests: int,
    signal_sets: Sequence[str],
    max_seconds: float,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Every (signal set, concurrency) level against one server, each after an untimed warm-up."""
    levels = [(s, c) for s in signal_sets for c in concurrency]
    rows = []
    for signal_set, c in maybe_tqdm(levels, progress, url, leave=False):
        chosen = None if signal_set == "default" else signal_set
        load_level(url, images, c, 2 * c, signal_set=chosen, max_seconds=max_seconds)  # warm-up
        rows.append(load_level(url, images, c, n_requests, signal_set=chosen, max_seconds=max_seconds))
    return rows


def batching_ratio(results: dict[str, list[dict[str, Any]]], concurrency: int) -> list[dict[str, Any]]:
    """Throughput with batching over without, per signal set, at ``concurrency``."""
    out = []
    if "batched" not in results or "unbatched" not in results:
        return out
    for on in results["batched"]:
        if on["concurrency"] != concurrency:
            continue
        off = next(
            (
                r
                for r in results["unbatched"]
                if r["concurrency"] == concurrency and r["signal_set"] == on["signal_set"]
            ),
            None,
        )
        if off and off["throughput_rps"] > 0:
            ratio = on["throughput_rps"] / off["throughput_rps"]
            out.append(
                {
                    "signal_set": on["signal_set"],
                    "concurrency": concurrency,
                    "batched_rps": on["throughput_rps"],
                    "unbatched_rps": off["throughput_rps"],
                    "ratio": ratio,
                    "batched_p99_ms": on["p99_ms"],
                    "unbatched_p99_ms": off["p99_ms"],
                    "target": ">= 3",
                    "met": ratio >= 3,
                }
            )
    return out


def run_serve_benchmark(
    *,
    bundle: str | Path | None = None,
    url: str | None = None,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    n_requests: int = 200,
    signal_sets: Sequence[str] = DEFAULT_SIGNAL_SETS,
    modes: Sequence[str] = tuple(MODES),
    max_seconds: float = 60.0,
    threads: int | None = None,
    n_images: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Load servers (own ones per mode with ``bundle``, else the one at ``url``); what ``--out`` writes."""
    if (bundle is None) == (url is None):
        raise ValueError("give exactly one of bundle and url")
    started = time.perf_counter()
    images, source = bundle_pngs(bundle, n_images) if bundle is not None else url_pngs(str(url), n_images)
    results: dict[str, list[dict[str, Any]]] = {}
    if url is not None:
        results["as running"] = load_server(
            url, images, concurrency, n_requests, signal_sets, max_seconds, progress
        )
    else:
        for mode in modes:
            with running_server(bundle, MODES[mode], threads) as server_url:
                results[mode] = load_server(
                    server_url, images, concurrency, n_requests, signal_sets, max_seconds, progress
                )
    return {
        "target": str(bundle if bundle is not None else url),
        "images": source,
        "requests_per_level": n_requests,
        "max_seconds_per_level": max_seconds,
        "server_threads": threads,
        "cpu_count": os.cpu_count(),
        "results": results,
        "batching_ratio": batching_ratio(results, max(concurrency)),
        "wall_seconds": time.perf_counter() - started,
    }


def _fmt(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else "n/a"


def markdown(result: dict[str, Any]) -> str:
    head = (
        "| server | signal set | concurrency | requests ok | errors | p50 ms | p95 ms | p99 ms | req/s "
        "| mean gate batch |"
    )
    lines = [head, "|" + " --- |" * 10]
    for mode, rows in result["results"].items():
        for r in rows:
            errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
            lines.append(
                f"| {mode} | {r['signal_set']} | {r['concurrency']} | {r['requests_ok']} | {errors} | "
                f"{_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | "
                f"{_fmt(r['throughput_rps'])} | "
                f"{_fmt(r['mean_batch_size'])} |"
            )
    if result["batching_ratio"]:
        lines += [
            "",
            (
                "| signal set | concurrency | batched req/s | unbatched req/s | ratio | batched p99 ms "
                "| goal | met |"
            ),
        ]
        lines.append("|" + " --- |" * 8)
        for r in result["batching_ratio"]:
            lines.append(
                f"| {r['signal_set']} | {r['concurrency']} | {_fmt(r['batched_rps'])} | "
                f"{_fmt(r['unbatched_rps'])} | {r['ratio']:.2f} | {_fmt(r['batched_p99_ms'])} | "
                f"{r['target']} | {'yes' if r['met'] else 'no'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.serve (--bundle B | --url U) [--concurrency 1 8 32] [--requests 200] [--out J]``"""
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--bundle", help="start own servers on this bundle (batching on and off)")
    target.add_argument("--url", help="load an already running server instead")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY))
    parser.add_argument("--requests", type=int, default=200, help="timed requests per level")
    parser.add_argument(
        "--signal-sets", nargs="+", default=list(DEFAULT_SIGNAL_SETS), help="'default' = the server's"
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time limit per level")
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS of the started servers (default: torch's)"
    )
    parser.add_argument("--out", help="write the full result as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < 1:
        parser.error("concurrency and requests must be >= 1")
    result = run_serve_benchmark(
        bundle=args.bundle,
        url=args.url,
        concurrency=args.concurrency,
        n_requests=args.requests,
        signal_sets=args.signal_sets,
        modes=args.modes,
        max_seconds=args.max_seconds,
        threads=args.threads,
        progress=progress_wanted(args.no_progress),
    )
    return finish(result, "bench.serve", argv, args.out, markdown)


if __name__ == "__main__":
    sys.exit(main())

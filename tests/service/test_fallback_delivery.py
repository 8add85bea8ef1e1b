"""Durable fallback delivery with real processes: the server (``python -m service.server``, tiny bundle)
delivers every ``unknown`` image to the example receiver (examples/fallback_receiver.py), which answers
503 to a third of the deliveries, loses the acknowledgement of a quarter and is stopped and restarted
once; the server is killed with SIGKILL mid-delivery and restarted on the same outbox. Every ``unknown``
answer's item reaches the receiver, carrying the image as sent, and takes effect once by its key.
Then the same with two replicas sharing the Redis Streams outbox: one is killed with SIGKILL while it
holds leases, and the other takes its entries over."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.fallback.outbox import Outbox
from service.fallback.redis_outbox import GROUP, RedisOutbox
from tests.deploy.processes import ROOT, free_port, start_server, stop, wait_for, wait_ready
from tests.service.conftest import png_bytes
from tests.service.redis_server import RedisServer

pytestmark = pytest.mark.integration


def start_receiver(port: int, db: Path, log: Path) -> subprocess.Popen[bytes]:
    # a lost acknowledgement in a quarter of the stored deliveries: over the 20-30 items of a test the
    # chance that none is resent (and the "retried" check below has nothing to see) is below 1e-3
    command = [
        sys.executable,
        str(ROOT / "examples" / "fallback_receiver.py"),
        "--port",
        str(port),
        "--db",
        str(db),
        "--fail-rate",
        "0.33",
        "--lost-ack-rate",
        "0.25",
        "--delay-s",
        "0.1",
        "--seed",
        str(port),
    ]
    process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    wait_for(
        lambda: httpx.get(f"http://127.0.0.1:{port}/items", timeout=2).status_code == 200, 30, "the receiver"
    )
    return process


def received(port: int) -> dict[str, dict]:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/items", timeout=5).json()
    except httpx.HTTPError:
        return {}


def delivery_env(receiver_port: int, **outbox: str) -> dict[str, str]:
    """A server that delivers to the receiver with short timeouts, leases and backoff; ``outbox`` names
    its store (``PREDGATE_FALLBACK_DIR`` or ``PREDGATE_FALLBACK_REDIS_URL`` and its prefix)."""
    return {
        "PREDGATE_FALLBACK_URL": f"http://127.0.0.1:{receiver_port}/items",
        "PREDGATE_FALLBACK_TIMEOUT_S": "1",
        "PREDGATE_FALLBACK_LEASE_S": "2",
        "PREDGATE_FALLBACK_BACKOFF_BASE_S": "0.05",
        "PREDGATE_FALLBACK_BACKOFF_CAP_S": "0.5",
        "PREDGATE_FALLBACK_MAX_ATTEMPTS": "1000",
        # the strictest stored point: most noise images are then unknown (enough items to interrupt)
        "PREDGATE_OPERATING_POINT": "wrong-recall=0.995",
        **outbox,
    }


def post_noise(
    base: str,
    rng: np.random.Generator,
    rounds: range,
    expected: dict[str, tuple[str, int]],
    verdicts: list[str],
) -> None:
    """``len(rounds)`` batches of 10 noise PNGs to ``base``; each unknown's item key goes into ``expected``
    with (request id, bytes of the image sent)."""
    for r in rounds:
        pngs = [png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(10)]
        body = {"images": [base64.b64encode(p).decode() for p in pngs]}
        answer = httpx.post(
            f"{base}/predict/batch", json=body, headers={"x-request-id": f"batch-{r}"}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        for png, record in zip(pngs, answer.json(), strict=True):
            verdicts.append(record["verdict"])
            if record["verdict"] == "unknown":
                assert record["fallback_item"], record
                expected[record["fallback_item"]] = (f"batch-{r}", len(png))
            else:
                assert record["fallback_item"] is None


def assert_received_once(listing: dict[str, dict], expected: dict[str, tuple[str, int]]) -> None:
    assert set(listing) == set(expected)  # none lost, none invented
    for key, (request_id, size) in expected.items():
        assert listing[key]["request_id"] == request_id and listing[key]["verdict"] == "unknown"
        assert listing[key]["image_bytes"] == size  # the PNG as sent


def test_every_unknown_reaches_a_flaky_receiver_once_through_a_kill_9(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    receiver_port, port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    env = delivery_env(receiver_port, PREDGATE_FALLBACK_DIR=str(tmp_path / "outbox"))
    rlog, slog = tmp_path / "receiver.log", tmp_path / "server.log"
    receiver = start_receiver(receiver_port, tmp_path / "received.sqlite3", rlog)
    server = start_server(tiny_bundle, port, slog, env=env)
    try:
        wait_ready(server, base, slog)
        expected: dict[str, tuple[str, int]] = {}  # item key -> (request id, bytes of the image sent)
        verdicts: list[str] = []
        post_noise(base, np.random.default_rng(0), range(3), expected, verdicts)
        assert len(expected) >= 10, verdicts  # noise is mostly rejected; enough items to interrupt

        # the receiver goes down for a second while deliveries are under way
        wait_for(lambda: len(received(receiver_port)) >= 2, 60, "first deliveries")
        receiver.kill()
        receiver.wait()
        time.sleep(1.0)
        receiver = start_receiver(receiver_port, tmp_path / "received.sqlite3", rlog)

        # then the server dies mid-delivery, without a chance to clean up
        wait_for(lambda: len(received(receiver_port)) >= min(len(expected) - 3, 6), 60, "more deliveries")
        got_before_kill = len(received(receiver_port))
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        assert got_before_kill < len(expected), "everything arrived before the kill: the test proved nothing"

        server = start_server(tiny_bundle, port, slog, env=env)  # same outbox: pending items replay
        wait_ready(server, base, slog)
        wait_for(lambda: set(received(receiver_port)) >= set(expected), 90, "every item at the receiver")
        listing = received(receiver_port)
        assert_received_once(listing, expected)
        assert sum(item["deliveries"] for item in listing.values()) > len(expected)  # retried: at least once
        wait_for(lambda: Outbox(tmp_path / "outbox").counts().delivered == len(expected), 30, "outbox marked")
        counts = Outbox(tmp_path / "outbox").counts()
        assert (counts.pending, counts.dead) == (0, 0)

        def drained_metrics() -> str | None:
            text = httpx.get(f"{base}/metrics", timeout=5).text
            return text if "predgate_fallback_outbox_pending 0.0" in text else None

        metrics = wait_for(drained_metrics, 10, "the pending gauge at 0")
        assert "predgate_fallback_delivered_total" in metrics
        print(
            f"\n{len(verdicts)} images, {len(expected)} unknown; "
            f"{got_before_kill} received before the SIGKILL; "
            f"{sum(item['deliveries'] for item in listing.values())} deliveries for {len(listing)} keys"
        )
    finally:
        stop(server)
        receiver.kill()
        receiver.wait()


def test_two_replicas_on_one_redis_deliver_every_unknown_once_through_a_kill_9_of_one(
    tiny_bundle: Path, tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    receiver_port, port_a, port_b = free_port(), free_port(), free_port()
    base_a, base_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    env = delivery_env(
        receiver_port,
        PREDGATE_FALLBACK_REDIS_URL=redis_server.url,
        PREDGATE_FALLBACK_REDIS_PREFIX=redis_prefix,
    )
    log_a, log_b = tmp_path / "replica-a.log", tmp_path / "replica-b.log"
    receiver = start_receiver(receiver_port, tmp_path / "received.sqlite3", tmp_path / "receiver.log")
    replica_a = start_server(tiny_bundle, port_a, log_a, env=env)
    replica_b = start_server(tiny_bundle, port_b, log_b, env=env)
    box = RedisOutbox(redis_server.url, redis_prefix)  # to look in, as an operator would
    try:
        wait_ready(replica_a, base_a, log_a)
        wait_ready(replica_b, base_b, log_b)
        expected: dict[str, tuple[str, int]] = {}
        verdicts: list[str] = []
        rng = np.random.default_rng(1)
        post_noise(base_b, rng, range(1), expected, verdicts)
        post_noise(base_a, rng, range(1, 3), expected, verdicts)  # A's delivery thread claims these at once
        assert len(expected) >= 10, verdicts

        def held_by_a() -> dict[str, str]:
            """Entry id -> item key of the entries leased to replica A (its consumer is host:pid:tag)."""
            stream = box.prefix + "stream"
            names = [c["name"] for c in box.client.xinfo_consumers(stream, GROUP)]
            mine = [n for n in names if f":{replica_a.pid}:" in n.decode()]
            ids = [
                p["message_id"]
                for n in mine
                for p in box.client.xpending_range(stream, GROUP, "-", "+", 1000, consumername=n)
            ]
            return {i.decode(): box.client.xrange(stream, i, i)[0][1][b"key"].decode() for i in ids}

        # A dies holding leases on the shared stream, without a chance to clean up
        wait_for(lambda: len(held_by_a()) >= 2, 30, "replica A to hold leases")
        os.kill(replica_a.pid, signal.SIGKILL)
        replica_a.wait()
        leased = held_by_a()  # still A's: nobody may take an entry over before its lease (2 s) runs out
        got_before_kill = len(received(receiver_port))
        assert leased, "the killed replica held no lease: the test proved nothing"
        assert box.counts().pending > 0

        # B takes A's entries over once their lease (2 s) has run out, and delivers everything
        wait_for(lambda: set(received(receiver_port)) >= set(expected), 60, "every item at the receiver")
        listing = received(receiver_port)
        assert_received_once(listing, expected)
        wait_for(lambda: box.counts().delivered == len(expected), 30, "outbox marked")
        counts = box.counts()
        assert (counts.pending, counts.dead) == (0, 0)
        assert box.client.xlen(box.prefix + "stream") == 0  # no entry left behind
        assert not held_by_a()  # B took every entry A held over
        print(
            f"\n{len(verdicts)} images, {len(expected)} unknown; "
            f"{got_before_kill} received before the SIGKILL of "
            f"replica A, which held {len(leased)} leased entries; "
            f"{sum(item['deliveries'] for item in listing.values())} deliveries for {len(listing)} keys"
        )
    finally:
        box.close()
        stop(replica_a)
        stop(replica_b)
        receiver.kill()
        receiver.wait()

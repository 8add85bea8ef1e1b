"""What only the Redis Streams outbox has to show (the behaviours both stores share run on both in
test_fallback_outbox.py): a late duplicate worker changes nothing, retries wait in the delay queue,
a delivered item keeps its record without its image, items and leases survive a ``kill -9`` of Redis
itself, a Redis that goes away mid-run turns requests with an ``unknown`` into 503 (and back once it
returns), and the settings and start-up refuse what cannot work."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from models.errors import ConfigError
from service.fallback.outbox import NewItem
from service.fallback.redis_outbox import GROUP, RedisOutbox
from tests.deploy.processes import free_port
from tests.service.conftest import make_settings, png_bytes
from tests.service.redis_server import RedisServer


def items(n: int) -> list[NewItem]:
    return [
        NewItem({"request_id": f"r{i}", "prediction": {"verdict": "unknown"}}, bytes([i]) * 8, "image/png")
        for i in range(n)
    ]


@pytest.fixture
def boxes(redis_server: RedisServer, redis_prefix: str) -> Iterator[Callable[[], RedisOutbox]]:
    """Opens another replica's handle on one outbox (its own consumer of the delivery group)."""
    opened: list[RedisOutbox] = []

    def make() -> RedisOutbox:
        opened.append(RedisOutbox(redis_server.url, redis_prefix))
        return opened[-1]

    yield make
    for box in opened:
        box.close()


def in_flight(box: RedisOutbox) -> int:
    """Entries on the work queue: waiting for a worker or leased to one."""
    return int(box.client.xlen(box.prefix + "stream"))


def test_a_late_duplicate_worker_can_neither_resurrect_nor_double_count_an_item(
    boxes: Callable[[], RedisOutbox],
) -> None:
    slow, other = boxes(), boxes()
    first, second = slow.enqueue(items(2))
    assert sorted(c.key for c in slow.claim(10, lease_s=0.3)) == sorted([first, second])
    assert other.claim(10, lease_s=0.3) == []  # leased: not handed out twice
    time.sleep(0.4)  # the slow worker overruns its lease: the other replica takes both over
    assert sorted(c.key for c in other.claim(10, lease_s=0.3)) == sorted([first, second])
    other.delivered(first)
    other.failed(second, "HTTP 422 (refused by the receiver)", None)
    # the slow worker comes back with its own (stale) outcomes
    slow.failed(first, "HTTP 503", time.time())
    slow.delivered(second)
    slow.delivered(first)
    assert slow.item(first)["state"] == "delivered" and slow.item(first)["attempts"] == 1  # type: ignore[index]
    assert slow.item(second)["state"] == "dead" and slow.item(second)["attempts"] == 1  # type: ignore[index]
    counts = slow.counts()
    assert (counts.pending, counts.delivered, counts.dead) == (0, 1, 1)
    assert in_flight(slow) == 0 and slow.claim(10, 0.3, now=time.time() + 3600) == []  # nothing left to send
    assert slow.client.xpending(slow.prefix + "stream", GROUP)["pending"] == 0


def test_a_retry_waits_in_the_delay_queue_and_rejoins_the_stream_when_due(
    boxes: Callable[[], RedisOutbox],
) -> None:
    box = boxes()
    (key,) = box.enqueue(items(1))
    (claimed,) = box.claim(10, lease_s=30)
    now = time.time()
    box.failed(key, "HTTP 503", now + 60)
    assert in_flight(box) == 0 and box.client.zscore(box.prefix + "delayed", key) == pytest.approx(now + 60)
    assert box.claim(10, lease_s=30, now=now + 30) == []  # not due yet
    assert box.counts().pending == 1 and box.item(key)["last_error"] == "HTTP 503"  # type: ignore[index]
    (again,) = box.claim(10, lease_s=30, now=now + 61)
    assert again.key == key and again.attempts == 1 and again.item.image == claimed.item.image
    assert box.client.zcard(box.prefix + "delayed") == 0


def test_a_delivered_item_keeps_its_record_but_not_its_image(boxes: Callable[[], RedisOutbox]) -> None:
    box = boxes()
    (key,) = box.enqueue(items(1))
    assert box.item(key)["image"] == bytes([0]) * 8  # type: ignore[index]
    box.claim(10, lease_s=30)
    box.delivered(key)
    kept = box.item(key)
    assert kept is not None and kept["state"] == "delivered" and kept["image"] == b""
    assert kept["meta"]["request_id"] == "r0" and kept["image_type"] == "image/png"
    assert box.counts().oldest_pending_age_s is None


def test_a_consumer_that_holds_nothing_leaves_the_group_and_one_that_holds_entries_stays(
    boxes: Callable[[], RedisOutbox],
) -> None:
    idle, holder = boxes(), boxes()
    holder.enqueue(items(1))
    idle.claim(10, 30)
    assert len(idle.claim(10, 30)) == 0 and len(holder.claim(10, 30)) == 0  # idle took it; nothing more

    def consumers() -> dict[str, int]:
        listing = idle.client.xinfo_consumers(idle.prefix + "stream", GROUP)
        return {c["name"].decode(): c["pending"] for c in listing}

    assert consumers()[idle.consumer] == 1
    holder.close()
    idle.close()
    assert holder.consumer not in consumers() and consumers()[idle.consumer] == 1  # kept for an XAUTOCLAIM


def test_items_and_leases_survive_a_kill_9_of_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        box = RedisOutbox(server.url, "t:")
        keys = box.enqueue(items(5))
        assert len(box.claim(2, lease_s=0.3)) == 2  # in flight when Redis dies
        box.close()
        server.kill()  # appendfsync always: every acknowledged write is in the append-only file
        server.start()
        again = RedisOutbox(server.url, "t:")
        assert again.counts().pending == 5
        fresh = again.claim(10, lease_s=0.3)
        assert len(fresh) == 3  # the two leased ones are still leased
        for claimed in fresh:
            again.delivered(claimed.key)
        time.sleep(0.4)
        late = again.claim(10, lease_s=0.3)  # their lease ran out: taken over
        assert len(late) == 2 and {c.key for c in fresh + late} == set(keys)
        for claimed in late:  # the image as enqueued
            assert claimed.item.image == bytes([int(claimed.item.meta["request_id"][1:])]) * 8
        again.close()
    finally:
        server.stop()


def test_requests_with_an_unknown_get_503_while_redis_is_down_and_200_once_it_is_back(
    app_client: Callable[..., Any], sample_images: Any, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    settings = {
        "fallback_url": "http://127.0.0.1:9/items",  # nobody listens: items stay pending
        "fallback_redis_url": server.url,
        "operating_point": "wrong-recall=0.995",
        "warmup": False,
    }
    files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(sample_images[:12])]
    try:
        with app_client(**settings) as client:
            answer = client.post("/predict/batch", files=files)
            assert answer.status_code == 200 and any(r["fallback_item"] for r in answer.json())
            server.kill()
            answer = client.post("/predict/batch", files=files)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
            assert answer.json()["error"]["type"] == "fallback_unavailable"
            assert "ConnectionError" in answer.json()["error"]["message"]
            server.start()  # same port, same append-only file
            answer = client.post("/predict/batch", files=files)
            assert answer.status_code == 200, answer.text
            box = client.app.state.predgate.outbox
            assert isinstance(box, RedisOutbox)
            unknown = sum(1 for r in answer.json() if r["fallback_item"])
            assert box.counts().pending == 2 * unknown  # the first request's items survived the kill
    finally:
        server.stop()


def test_start_up_stops_when_redis_cannot_be_reached(app_client: Callable[..., Any]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    client = app_client(fallback_url="http://127.0.0.1:9/items", fallback_redis_url=url, warmup=False)
    with pytest.raises(ConfigError, match="cannot be used .*PREDGATE_FALLBACK_REDIS_URL"), client:
        pass


def test_settings_refuse_the_review_page_on_redis_and_a_url_that_is_not_redis(tiny_bundle: Path) -> None:
    with pytest.raises(ValidationError, match="review .*unset PREDGATE_FALLBACK_REDIS_URL"):
        make_settings(tiny_bundle, review=True, fallback_redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(ValidationError, match="redis://host:port/db"):
        make_settings(tiny_bundle, fallback_redis_url="127.0.0.1:6379")
    settings = make_settings(tiny_bundle, fallback_redis_url="redis://:s3cret@127.0.0.1:6379/0")
    assert "s3cret" not in repr(settings)  # the URL may carry Redis's password
    assert isinstance(redis.Redis.from_url(settings.fallback_redis_url.get_secret_value()), redis.Redis)  # type: ignore[union-attr]

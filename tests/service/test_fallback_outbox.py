"""The outbox and the delivery thread against the example receiver (examples/fallback_receiver.py) in
this process: retries until delivered, one effect per key when acknowledgements are lost, dead letters,
backoff bounds, and replay of a delivery that died holding its lease. Each outbox test runs on both
stores: the SQLite outbox and the Redis Streams one (a real redis-server, tests/service/redis_server.py)."""

from __future__ import annotations

import importlib.util
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from service.fallback.delivery import DeliveryPolicy, DeliveryWorker, backoff_s
from service.fallback.outbox import NewItem, Outbox
from service.fallback.redis_outbox import RedisOutbox
from service.fallback.store import FallbackStore

ROOT = Path(__file__).resolve().parents[2]


def _receiver_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fallback_receiver", ROOT / "examples" / "fallback_receiver.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECEIVER = _receiver_module()


def serve(tmp_path: Path, **rates: float) -> tuple[str, object, ThreadingHTTPServer]:
    store = RECEIVER.Store(tmp_path / "received.sqlite3")
    handler = RECEIVER.make_handler(
        store, rates.get("fail", 0.0), rates.get("lost_ack", 0.0), 0.0, random.Random(1)
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/items", store, server


@dataclass
class Store:
    """One test's outbox store: each :meth:`open` is another process's handle on the same items."""

    kind: str
    make: Callable[[], FallbackStore]
    admin_args: list[str]
    """How ``python -m service.fallback.admin`` is told where it is."""
    settings: dict[str, object]
    """The server settings that put the fallback outbox there."""
    opened: list[FallbackStore] = field(default_factory=list)

    def open(self) -> FallbackStore:
        self.opened.append(self.make())
        return self.opened[-1]


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        directory = tmp_path / "outbox"
        chosen = Store(
            "sqlite", lambda: Outbox(directory), ["--dir", str(directory)], {"fallback_dir": directory}
        )
    else:
        url, prefix = request.getfixturevalue("redis_server").url, request.getfixturevalue("redis_prefix")
        chosen = Store(
            "redis",
            lambda: RedisOutbox(url, prefix),
            ["--redis-url", url, "--redis-prefix", prefix],
            {"fallback_redis_url": url, "fallback_redis_prefix": prefix},
        )
    yield chosen
    for box in chosen.opened:
        box.close()


@pytest.fixture
def outbox(store: Store) -> FallbackStore:
    return store.open()


def items(n: int) -> list[NewItem]:
    return [
        NewItem(
            {"request_id": f"r{i}", "index": 0, "bundle_id": "b", "prediction": {"verdict": "unknown"}},
            bytes([i % 256]) * 10,
            "image/png",
        )
        for i in range(n)
    ]


def drain(worker: DeliveryWorker, outbox: FallbackStore, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while outbox.counts().pending and time.monotonic() < end:
        if not worker.run_once():
            time.sleep(0.01)


def fast_policy(url: str, **overrides: float) -> DeliveryPolicy:
    values = {
        "timeout_s": 2.0,
        "max_attempts": 50,
        "backoff_base_s": 0.01,
        "backoff_cap_s": 0.05,
        "lease_s": 5.0,
    }
    values.update(overrides)
    return DeliveryPolicy(url=url, **values)  # type: ignore[arg-type]


def test_every_item_reaches_a_flaky_receiver_once_by_key(outbox: FallbackStore, tmp_path: Path) -> None:
    url, store, server = serve(tmp_path, fail=0.5, lost_ack=0.3)
    try:
        keys = outbox.enqueue(items(40))
        worker = DeliveryWorker(outbox, fast_policy(url), random.Random(0))
        drain(worker, outbox)
    finally:
        server.shutdown()
    received = store.listing()
    assert set(received) == set(keys)  # none lost, none invented
    assert outbox.counts().delivered == 40 and outbox.counts().pending == 0
    # lost acknowledgements made some items arrive twice or more: the key kept their effect single
    assert sum(r["deliveries"] for r in received.values()) > 40
    assert {r["request_id"] for r in received.values()} == {f"r{i}" for i in range(40)}
    attempts = [outbox.item(k)["attempts"] for k in keys]  # type: ignore[index]
    assert max(attempts) > 1


def test_a_refusing_receiver_dead_letters_at_once_and_a_down_one_after_max_attempts(
    outbox: FallbackStore, tmp_path: Path
) -> None:
    # 422 from the receiver (it cannot read the item): retrying will not help
    url, _, server = serve(tmp_path)
    try:
        (bad,) = outbox.enqueue([NewItem({"request_id": "x"}, b"", "image/png")])  # no prediction: 422
        DeliveryWorker(outbox, fast_policy(url), random.Random(0)).run_once()
    finally:
        server.shutdown()
        server.server_close()
    state = outbox.item(bad)
    assert state is not None and state["state"] == "dead" and state["attempts"] == 1
    assert "422" in state["last_error"] and "refused" in state["last_error"]
    # nobody listening: connection refused, retried with backoff, dead after max_attempts
    (down,) = outbox.enqueue(items(1))
    worker = DeliveryWorker(outbox, fast_policy(url, max_attempts=4), random.Random(0))
    drain(worker, outbox)
    state = outbox.item(down)
    assert state is not None and state["state"] == "dead" and state["attempts"] == 4
    assert "4 attempts" in state["last_error"]
    counts = outbox.counts()
    assert (counts.pending, counts.dead) == (0, 2)


def test_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    policy = DeliveryPolicy(url="http://x", backoff_base_s=0.5, backoff_cap_s=8.0)
    rng = random.Random(0)
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (30, 8.0)]:
        draws = [backoff_s(failures, policy, rng) for _ in range(2000)]
        assert min(draws) >= 0.01 and max(draws) <= ceiling
        assert max(draws) > 0.9 * ceiling and min(draws) < 0.1 * ceiling + 0.01  # spread over the range


def test_a_delivery_that_died_holding_its_lease_is_replayed_after_it_expires(store: Store) -> None:
    first = store.open()
    keys = first.enqueue(items(3))
    claimed = first.claim(10, lease_s=0.5)
    assert [c.key for c in claimed] and len(claimed) == 3
    first.close()  # the process died mid-delivery: nothing marked
    second = store.open()  # the restarted server (or, on Redis, another replica)
    assert second.claim(10, lease_s=0.5) == []  # leases still live: not sent twice at once
    assert second.counts().pending == 3
    time.sleep(0.6)
    again = second.claim(10, lease_s=0.5)
    assert sorted(c.key for c in again) == sorted(keys)
    assert (
        again[0].item.meta["prediction"] == {"verdict": "unknown"} and again[0].item.image_type == "image/png"
    )


def test_enqueue_is_all_or_nothing(outbox: FallbackStore) -> None:
    # SQLite: the third row fails as SQLite binds it, after the first two were inserted in the transaction;
    # Redis: the batch is one script, refused before it is sent
    bad = [*items(2), NewItem({"request_id": "r"}, object(), "image/png")]  # type: ignore[arg-type]
    with pytest.raises((sqlite3.ProgrammingError, TypeError)):
        outbox.enqueue(bad)
    assert outbox.counts().pending == 0
    assert len(outbox.enqueue(items(2))) == 2 and outbox.counts().pending == 2  # the outbox still works


def test_dead_items_can_be_listed_and_requeued_from_the_command_line(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.fallback import admin

    box = store.open()
    (key,) = box.enqueue(items(1))
    box.failed(key, "HTTP 422 (refused by the receiver)", None)
    assert admin.main([*store.admin_args, "dead"]) == 0
    assert key in capsys.readouterr().out
    assert admin.main([*store.admin_args, "requeue"]) == 0
    assert "requeued 1" in capsys.readouterr().out
    assert box.item(key)["state"] == "pending" and box.item(key)["attempts"] == 0  # type: ignore[index]
    assert admin.main([*store.admin_args, "status"]) == 0
    assert '"pending": 1' in capsys.readouterr().out
    if store.kind == "sqlite":
        assert admin.main(["--dir", str(tmp_path / "elsewhere"), "status"]) == 2
        assert "no outbox" in capsys.readouterr().err
    else:
        assert admin.main(["--redis-url", "redis://127.0.0.1:1/0", "status"]) == 2
        assert "cannot be used" in capsys.readouterr().err


def test_the_predict_route_stores_unknowns_before_answering_and_refuses_when_it_cannot(
    app_client,
    sample_images,
    store: Store,  # type: ignore[no-untyped-def]
) -> None:
    import io

    import numpy as np

    from tests.service.conftest import png_bytes

    settings = {
        "fallback_url": "http://127.0.0.1:9/items",  # nobody listens: items stay pending
        **store.settings,
        "operating_point": "wrong-recall=0.995",
        "warmup": False,
    }
    with app_client(**settings) as client:
        files = [
            ("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(sample_images[:12])
        ]
        answer = client.post("/predict/batch", files=files, headers={"x-request-id": "fb-1"})
        assert answer.status_code == 200, answer.text
        records = answer.json()
        unknown = [i for i, r in enumerate(records) if r["verdict"] == "unknown"]
        assert unknown and all((r["fallback_item"] is None) == (r["verdict"] == "accept") for r in records)
        box = client.app.state.predgate.outbox  # type: ignore[attr-defined]
        for i in unknown:
            stored = box.item(records[i]["fallback_item"])
            assert stored["meta"]["request_id"] == "fb-1" and stored["meta"]["index"] == i
            assert stored["meta"]["prediction"]["label"] == records[i]["label"]
        first = box.item(records[unknown[0]]["fallback_item"])
        assert first["image"] == png_bytes(sample_images[unknown[0]]) and first["image_type"] == "image/png"
        # a JSON tensor is kept as the normalised values received (.npy)
        loaded = client.app.state.predgate.loaded  # type: ignore[attr-defined]
        tensor = loaded.bundle.normalisation.apply(sample_images[unknown[0]][None]).numpy()[0]
        answer = client.post("/predict", json={"tensor": tensor.tolist()})
        assert answer.json()["verdict"] == "unknown"  # the image the batch rejected, as a tensor
        kept = box.item(answer.json()["fallback_item"])
        assert kept["image_type"] == "application/x-npy"
        assert np.array_equal(np.load(io.BytesIO(kept["image"])), tensor)

        # the outbox cannot be written: the answer is withheld (503, retry), not an unknown nobody sees
        def broken(items: object) -> list[str]:
            raise OSError("disk full")

        box.enqueue = broken
        answer = client.post("/predict/batch", files=files)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        assert answer.json()["error"]["type"] == "fallback_unavailable"

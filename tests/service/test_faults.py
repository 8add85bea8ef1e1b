"""Faults injected into the real gate of an app over the tiny bundle: a poisoned image among its
batch-mates, out of memory on a large batch, a stuck batch (watchdog and readiness), a request whose
deadline passes while it is queued. The batcher alone is tested in ``test_batching.py``; SIGTERM under
load against a real server in ``test_load.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from models.bundle import Bundle
from models.gate import GateOutput
from service import metrics
from service.main import create_app
from service.state import load_service
from tests.service.conftest import make_settings

POISON = 1234.5
"""A tensor whose first value is this makes the injected gate return NaN probabilities for it."""
WATCHDOG_S = 1.0
LIVENESS_S = 3.0  # past the watchdog: /healthz fails so that an orchestrator restarts the replica


class Injector:
    """Wraps the loaded gate's ``run``: records batch sizes, and fails on request."""

    def __init__(self, run: Callable[..., GateOutput]) -> None:
        self.real_run = run
        self.calls: list[int] = []
        self.poison_nan = False
        self.oom_above: int | None = None
        self.hold = threading.Event()
        self.hold.set()
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor, **kwargs: Any) -> GateOutput:
        with self.lock:
            self.calls.append(int(x.shape[0]))
        self.hold.wait(30)
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        out = self.real_run(x, **kwargs)
        if self.poison_nan:
            poisoned = (x.reshape(x.shape[0], -1)[:, 0] == POISON).numpy()
            out.probabilities[poisoned] = np.nan
        return out


@pytest.fixture(scope="module")
def faulty(tiny_bundle: Path) -> Iterator[tuple[TestClient, Injector]]:
    settings = make_settings(
        tiny_bundle,
        warmup=False,
        signal_set="msp",
        max_queue_delay_ms=150.0,
        batch_watchdog_s=WATCHDOG_S,
        liveness_stuck_s=LIVENESS_S,
    )
    loaded = load_service(settings)
    injector = Injector(loaded.gate.run)
    loaded.gate.run = injector  # type: ignore[method-assign]
    with TestClient(create_app(settings, loaded=loaded)) as client:
        yield client, injector


@pytest.fixture
def gate_faults(faulty: tuple[TestClient, Injector]) -> Iterator[tuple[TestClient, Injector]]:
    client, injector = faulty
    yield client, injector
    injector.poison_nan, injector.oom_above = False, None
    injector.hold.set()
    injector.calls.clear()


def tensor(bundle: Bundle, first: float) -> list[Any]:
    values = np.zeros(bundle.input_shape)
    values.flat[0] = first
    return values.tolist()  # type: ignore[no-any-return]


def test_a_poisoned_image_fails_alone_and_its_batch_mates_are_answered(
    gate_faults: tuple[TestClient, Injector], bundle: Bundle
) -> None:
    client, injector = gate_faults
    injector.poison_nan = True
    injector.hold.clear()  # the first request holds the worker, so the next five queue into one batch
    firsts = [0.5, 0.1, 0.2, POISON, 0.3, 0.4]
    with ThreadPoolExecutor(len(firsts)) as pool:
        answers = [pool.submit(client.post, "/predict", json={"tensor": tensor(bundle, firsts[0])})]
        time.sleep(0.2)
        answers += [
            pool.submit(
                client.post, "/predict", json={"tensor": tensor(bundle, v)}, headers={"x-request-id": f"r{i}"}
            )
            for i, v in enumerate(firsts[1:], start=1)
        ]
        time.sleep(0.1)
        injector.hold.set()
        responses = [a.result(timeout=30) for a in answers]
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 200, 422, 200, 200], [r.text for r in responses]
    assert "not finite" in responses[3].json()["error"]["message"]
    assert [r.json()["request_id"] for i, r in enumerate(responses[1:], start=1) if i != 3] == [
        "r1",
        "r2",
        "r4",
        "r5",
    ]
    assert injector.calls[:2] == [1, 5] and 1 in injector.calls[2:]  # the batch of 5 failed, then was split


def test_out_of_memory_on_a_large_batch_splits_it_and_one_image_answers_503(
    gate_faults: tuple[TestClient, Injector], bundle: Bundle
) -> None:
    client, injector = gate_faults
    injector.oom_above = 4
    response = client.post("/predict/batch", json={"tensors": [tensor(bundle, 0.01 * i) for i in range(12)]})
    assert response.status_code == 200, response.text
    assert len(response.json()) == 12 and max(r["batch_size"] for r in response.json()) <= 4
    assert injector.calls[0] == 12
    injector.oom_above = 0
    response = client.post("/predict", json={"tensor": tensor(bundle, 0.0)})
    assert response.status_code == 503 and response.json()["error"]["type"] == "out_of_memory"
    assert response.headers["retry-after"]
    injector.oom_above = None
    assert client.post("/predict", json={"tensor": tensor(bundle, 0.0)}).status_code == 200
    assert client.get("/readyz").status_code == 200


def test_a_stuck_batch_turns_readiness_off_until_it_returns(
    gate_faults: tuple[TestClient, Injector], bundle: Bundle
) -> None:
    client, injector = gate_faults
    injector.hold.clear()
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(client.post, "/predict", json={"tensor": tensor(bundle, 0.1)})
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "watchdog" in ready.json()["detail"], ready.text
        assert client.get("/healthz").status_code == 200  # alive: the orchestrator should not restart it
        refused = client.post("/predict", json={"tensor": tensor(bundle, 0.2)})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "batch_stuck"
        assert refused.headers["retry-after"]
        deadline = time.monotonic() + 5  # the watchdog polls a quarter of its limit at a time
        while "predgate_batch_stuck 1.0" not in client.get("/metrics").text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "predgate_batch_stuck 1.0" in client.get("/metrics").text
        injector.hold.set()
        assert stuck.result(timeout=30).status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.post("/predict", json={"tensor": tensor(bundle, 0.3)}).status_code == 200


def test_a_batch_stuck_past_the_liveness_limit_fails_liveness_until_it_returns(
    gate_faults: tuple[TestClient, Injector], bundle: Bundle
) -> None:
    client, injector = gate_faults
    injector.hold.clear()
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        stuck = pool.submit(client.post, "/predict", json={"tensor": tensor(bundle, 0.1)})
        while client.get("/healthz").status_code == 200 and time.monotonic() - started < 15:
            time.sleep(0.05)
        failed_after = time.monotonic() - started
        alive = client.get("/healthz")
        assert alive.status_code == 503, alive.text
        assert alive.json()["status"] == "stuck" and "liveness limit of 3 s" in alive.json()["detail"]
        assert failed_after >= LIVENESS_S  # not before the limit
        assert client.get("/readyz").status_code == 503  # readiness went first
        injector.hold.set()
        assert stuck.result(timeout=30).status_code == 200
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").status_code == 200


def test_liveness_limit_must_exceed_the_watchdog(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="PREDGATE_LIVENESS_STUCK_S above PREDGATE_BATCH_WATCHDOG_S"):
        make_settings(tiny_bundle, batch_watchdog_s=30.0, liveness_stuck_s=10.0)
    assert make_settings(tiny_bundle, batch_watchdog_s=30.0, liveness_stuck_s=None).liveness_stuck_s is None


def test_a_request_whose_deadline_passes_while_queued_is_not_computed(
    gate_faults: tuple[TestClient, Injector], bundle: Bundle
) -> None:
    client, injector = gate_faults
    before = metrics.DEADLINE_EXPIRED.labels(where="queued")._value.get()
    injector.hold.clear()
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(client.post, "/predict", json={"tensor": tensor(bundle, 0.1)})
        time.sleep(0.1)
        late = pool.submit(
            client.post,
            "/predict",
            json={"tensor": tensor(bundle, 0.2)},
            headers={"x-request-timeout": "0.2"},
        )
        response = late.result(timeout=30)  # answered at its deadline, while the worker is still held
        injector.hold.set()
        assert busy.result(timeout=30).status_code == 200
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "deadline_exceeded" and "not computed" in response.text
    assert injector.calls == [1]  # the late image never reached the gate
    assert metrics.DEADLINE_EXPIRED.labels(where="queued")._value.get() == before + 1

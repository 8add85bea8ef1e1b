"""The delivery thread: POST due outbox items to the fallback URL until each is acknowledged or dead.

Each item goes as JSON with an ``Idempotency-Key`` header (the item's key, the same on every attempt),
so a receiver that remembers the keys it has processed applies each item once even though delivery
is at-least-once (a crash between the receiver's 2xx and our commit sends the item again).

Retries use exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff and
Jitter"): the n-th retry waits a uniform draw in [0, min(cap, base * 2**n)], so that many replicas
retrying after an outage of the receiver do not come back in lock-step; a ``Retry-After`` from the
receiver is honoured as a lower bound. A thread with ``urllib`` rather than an asyncio client: delivery
must not compete with the request path's event loop, and the service keeps no HTTP client dependency.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from service import metrics
from service.fallback.outbox import Claimed
from service.fallback.store import FallbackStore

log = logging.getLogger("predgate.fallback")

RETRY_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))
"""Answers that may succeed later; any other non-2xx is the receiver refusing the item for good."""


@dataclass(frozen=True)
class DeliveryPolicy:
    url: str
    timeout_s: float = 10.0
    max_attempts: int = 10
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 60.0
    lease_s: float = 30.0
    poll_s: float = 0.5
    batch: int = 16
    token: str | None = None  # sent as a bearer token when the receiver wants one


def backoff_s(failures: int, policy: DeliveryPolicy, rng: random.Random) -> float:
    """Wait before the next attempt after ``failures`` failed ones (full jitter, floor 10 ms)."""
    ceiling = min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** max(0, failures - 1))
    return max(0.01, rng.uniform(0.0, ceiling))


def item_body(item: Claimed) -> bytes:
    """The JSON the receiver gets: the item's record, its key and attempt, and the image in base64."""
    return json.dumps(
        {
            "key": item.key,
            "created_at": item.created_at,
            "attempt": item.attempts + 1,
            **item.item.meta,
            "image": {
                "media_type": item.item.image_type,
                "base64": base64.b64encode(item.item.image).decode("ascii"),
            },
        }
    ).encode()


def _retry_after_s(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return 0.0


class DeliveryWorker:
    """Claims due items, POSTs each, records the outcome; :meth:`run_once` is one round (for tests)."""

    def __init__(
        self, outbox: FallbackStore, policy: DeliveryPolicy, rng: random.Random | None = None
    ) -> None:
        self.outbox = outbox
        self.policy = policy
        self.rng = rng or random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def post(self, item: Claimed) -> tuple[int | None, str | None, str]:
        """(HTTP status or None, Retry-After, error text) of one attempt."""
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": item.key,
            "X-Predgate-Attempt": str(item.attempts + 1),
        }
        if self.policy.token:
            headers["Authorization"] = f"Bearer {self.policy.token}"
        request = urllib.request.Request(
            self.policy.url, data=item_body(item), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.policy.timeout_s) as response:
                return response.status, None, ""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Retry-After"), f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:  # refused, reset, timeout, DNS; ValueError: a bad URL
            return None, None, f"{type(exc).__name__}: {exc}"

    def attempt(self, item: Claimed) -> str:
        """Deliver one claimed item; returns 'delivered', 'retry' or 'dead'."""
        status, retry_after, error = self.post(item)
        if status is not None and 200 <= status < 300:
            self.outbox.delivered(item.key)
            metrics.FALLBACK_DELIVERED.inc()
            return "delivered"
        failures = item.attempts + 1
        permanent = status is not None and status not in RETRY_STATUSES
        if permanent or failures >= self.policy.max_attempts:
            reason = "refused by the receiver" if permanent else f"{failures} attempts"
            self.outbox.failed(item.key, f"{error} ({reason})", None)
            metrics.FALLBACK_DEAD.inc()
            log.warning("fallback item %s dead-lettered: %s (%s)", item.key, error, reason)
            return "dead"
        wait = max(backoff_s(failures, self.policy, self.rng), _retry_after_s(retry_after))
        self.outbox.failed(item.key, error, time.time() + wait)
        metrics.FALLBACK_RETRIED.inc()
        return "retry"

    def run_once(self) -> int:
        """One round: claim what is due and attempt it. Returns the number of items attempted."""
        items = self.outbox.claim(self.policy.batch, self.policy.lease_s)
        for item in items:
            if self._stop.is_set():
                break  # unattempted items keep their lease and come back when it expires
            self.attempt(item)
        self.refresh_gauges()
        return len(items)

    def refresh_gauges(self) -> None:
        counts = self.outbox.counts()
        metrics.FALLBACK_PENDING.set(counts.pending)
        metrics.FALLBACK_OLDEST_AGE.set(counts.oldest_pending_age_s or 0.0)

    def wake(self) -> None:
        """New items were enqueued: look now instead of at the next poll."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once() > 0
            except Exception:  # a locked or broken database: log, wait, go on (never kill the thread)
                log.exception("fallback delivery round failed")
                busy = False
            if not busy:
                self._wake.wait(self.policy.poll_s)
                self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="predgate-fallback-delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

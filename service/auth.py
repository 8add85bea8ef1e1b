"""Bearer keys (several at once, for rotation) and a per-key token-bucket rate limit.

Keys come from ``api_key`` and the comma-separated ``api_keys`` settings; any key set turns auth on.
A presented token is compared with every key (constant time, on SHA-256 digests so that neither the
keys' lengths nor which key matched show in the timing). Rotation: add the new key to
``PREDGATE_API_KEYS`` and roll the replicas, move the clients, then drop the old key and roll again.

The rate limit keeps one token bucket per key (by the key's digest, never the key itself), or per client
address when the server has no keys: ``rate_limit_per_s`` tokens a second, at most ``rate_limit_burst``
held; a request takes one token, and one that finds the bucket empty is refused with 429 and a
``Retry-After`` of the whole seconds until a token is back.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from service.settings import Settings

#: buckets kept at most (least recently used dropped first): a stream of made-up client addresses
#: cannot grow the table without bound
MAX_BUCKETS = 10_000


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def configured_keys(settings: Settings) -> list[str]:
    """Every key the settings accept, ``api_key`` first; blanks around commas ignored."""
    keys: list[str] = []
    if settings.api_key is not None and settings.api_key.get_secret_value().strip():
        keys.append(settings.api_key.get_secret_value().strip())
    if settings.api_keys is not None:
        keys.extend(k.strip() for k in settings.api_keys.get_secret_value().split(",") if k.strip())
    return list(dict.fromkeys(keys))


class KeyRing:
    """The accepted keys, as digests; :meth:`match` says which one a token is, in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, token: str) -> bytes | None:
        """The digest of the key ``token`` is, or None; every key is compared, whatever matches."""
        presented = _digest(token)
        found: bytes | None = None
        for digest in self._digests:
            if hmac.compare_digest(presented, digest):
                found = digest
        return found


class RateLimiter:
    """Token buckets by identity: ``rate`` tokens a second, ``burst`` at most (thread-safe)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: OrderedDict[bytes | str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, identity: bytes | str) -> float:
        """Take one token for ``identity``: 0.0 when granted, else the seconds until one is back."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(identity, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[identity] = (tokens, now)
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
            return wait


def retry_after_s(wait: float) -> int:
    """``Retry-After`` for a wait of ``wait`` seconds: whole seconds, at least 1."""
    return max(1, math.ceil(wait))

"""What the request path, the delivery thread and the admin command need from an outbox, whichever
store holds it: :class:`service.fallback.outbox.Outbox` (SQLite in WAL mode, one file under
``fallback_dir``: the default, for the workers of one machine) or
:class:`service.fallback.redis_outbox.RedisOutbox` (Redis Streams, shared by several replicas).

Both keep the same states (``pending``, ``delivered``, ``dead``), leases and at-least-once delivery;
:func:`open_store` picks one from the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from service.fallback.outbox import Claimed, NewItem, Outbox, OutboxCounts
from service.fallback.redis_outbox import DEFAULT_PREFIX, RedisOutbox


class FallbackStore(Protocol):
    """A durable outbox of fallback items (see :class:`service.fallback.outbox.Outbox` for the contract)."""

    @property
    def location(self) -> str:
        """Where the items live, for logs (never a password)."""
        ...

    def enqueue(self, items: list[NewItem], now: float | None = None) -> list[str]:
        """Store ``items`` all or none and return their keys; durable on return."""
        ...

    def claim(self, limit: int, lease_s: float, now: float | None = None) -> list[Claimed]:
        """Lease up to ``limit`` due pending items for ``lease_s``."""
        ...

    def delivered(self, key: str, now: float | None = None) -> None:
        """A pending item was acknowledged (no effect on an item that is no longer pending)."""
        ...

    def failed(self, key: str, error: str, retry_at: float | None) -> None:
        """One failed attempt: pending again from ``retry_at``, or dead when it is None (pending items
        only)."""
        ...

    def requeue_dead(self, now: float | None = None) -> int: ...

    def dead_items(self, limit: int = 100) -> list[dict[str, Any]]: ...

    def counts(self, now: float | None = None) -> OutboxCounts: ...

    def item(self, key: str) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


def open_store(
    directory: Path | str, redis_url: str | None = None, prefix: str = DEFAULT_PREFIX
) -> FallbackStore:
    """The Redis Streams outbox at ``redis_url`` (keys under ``prefix``), or the SQLite one in ``directory``.

    Raises
    ------
    ConfigError
        ``redis_url`` is set but the Redis there cannot be reached.
    """
    if redis_url is None:
        return Outbox(directory)
    return RedisOutbox(redis_url, prefix)

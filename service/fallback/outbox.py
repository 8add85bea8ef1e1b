"""The outbox: SQLite in WAL mode in a data directory, so that an ``unknown`` answer's fallback item
survives a crash (``kill -9``) of the server the moment the response has been sent.

Why SQLite: no server to run, atomic commits that reach the disk before :meth:`Outbox.enqueue`
returns, and several processes (uvicorn workers) may share one file. Items are *claimed* with a lease:
a delivery that dies with its process is retried by whoever finds the lease expired, which is what
makes delivery at-least-once; the receiver deduplicates by the item's key.

States: ``pending`` (waiting for its next attempt, maybe leased), ``delivered``, ``dead`` (given up after
``max_attempts`` failures, or refused for good by the receiver: a 4xx other than 408/429).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    delivered_at REAL,
    meta TEXT NOT NULL,
    image BLOB NOT NULL,
    image_type TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS items_due ON items (state, next_attempt_at);
"""
DB_FILE = "outbox.sqlite3"


@dataclass(frozen=True)
class NewItem:
    """What an ``unknown`` answer hands to the fallback: ``meta`` is the JSON-able record (request id,
    prediction, evidence, bundle id), ``image`` the input as received with its media type."""

    meta: dict[str, Any]
    image: bytes
    image_type: str


@dataclass(frozen=True)
class Claimed:
    """A stored item leased for one delivery attempt."""

    key: str
    created_at: float
    attempts: int
    item: NewItem


@dataclass(frozen=True)
class OutboxCounts:
    pending: int
    delivered: int
    dead: int
    oldest_pending_age_s: float | None


class Outbox:
    """One SQLite file; safe to use from several threads (one connection each) and processes."""

    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory) / DB_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self.connection()
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)

    @property
    def location(self) -> str:
        return str(self.path)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection to the outbox file (the review store shares it)."""
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so a claim is atomic
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            # FULL: the commit is on disk before enqueue returns (WAL's NORMAL could lose the last
            # commits on power loss; a process crash loses nothing either way)
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: the write lock is taken at the start, so a read-then-write
        (a claim, a review) cannot interleave with another process's."""
        db = self.connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def enqueue(self, items: list[NewItem], now: float | None = None) -> list[str]:
        """Store ``items`` in one transaction (all or none) and return their keys; durable on return."""
        now = time.time() if now is None else now
        keys = [uuid.uuid4().hex for _ in items]
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO items (key, created_at, state, next_attempt_at, meta, image, image_type) "
                "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                [
                    (key, now, now, json.dumps(item.meta), item.image, item.image_type)
                    for key, item in zip(keys, items, strict=True)
                ],
            )
        return keys

    def claim(self, limit: int, lease_s: float, now: float | None = None) -> list[Claimed]:
        """Lease up to ``limit`` due items (pending, attempt time reached, no live lease) for ``lease_s``."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            rows = db.execute(
                "SELECT key, created_at, attempts, meta, image, image_type FROM items "
                "WHERE state = 'pending' AND next_attempt_at <= ? AND lease_until <= ? "
                "ORDER BY next_attempt_at LIMIT ?",
                (now, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE items SET lease_until = ? WHERE key = ?", [(now + lease_s, r[0]) for r in rows]
            )
        return [Claimed(r[0], r[1], r[2], NewItem(json.loads(r[3]), r[4], r[5])) for r in rows]

    def delivered(self, key: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "UPDATE items SET state = 'delivered', delivered_at = ?, attempts = attempts + 1, "
                "lease_until = 0 "
                "WHERE key = ? AND state = 'pending'",
                (now, key),
            )

    def failed(self, key: str, error: str, retry_at: float | None) -> None:
        """One failed attempt: back to pending until ``retry_at``, or dead when ``retry_at`` is None."""
        with self.transaction() as db:
            if retry_at is None:
                db.execute(
                    "UPDATE items SET state = 'dead', attempts = attempts + 1, last_error = ?, "
                    "lease_until = 0 "
                    "WHERE key = ? AND state = 'pending'",
                    (error[:500], key),
                )
            else:
                db.execute(
                    "UPDATE items SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, "
                    "lease_until = 0 "
                    "WHERE key = ? AND state = 'pending'",
                    (error[:500], retry_at, key),
                )

    def requeue_dead(self, now: float | None = None) -> int:
        """Give every dead item a fresh set of attempts (after the receiver is fixed); returns how many."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE items SET state = 'pending', attempts = 0, next_attempt_at = ?, lease_until = 0 "
                "WHERE state = 'dead'",
                (now,),
            )
        return int(cursor.rowcount)

    def dead_items(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = (
            self.connection()
            .execute(
                "SELECT key, created_at, attempts, last_error, meta FROM items WHERE state = 'dead' "
                "ORDER BY created_at LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        return [
            {
                "key": r[0],
                "created_at": r[1],
                "attempts": r[2],
                "last_error": r[3],
                "request_id": json.loads(r[4]).get("request_id"),
            }
            for r in rows
        ]

    def counts(self, now: float | None = None) -> OutboxCounts:
        now = time.time() if now is None else now
        db = self.connection()
        by_state = dict(db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
        oldest = db.execute("SELECT MIN(created_at) FROM items WHERE state = 'pending'").fetchone()[0]
        return OutboxCounts(
            pending=int(by_state.get("pending", 0)),
            delivered=int(by_state.get("delivered", 0)),
            dead=int(by_state.get("dead", 0)),
            oldest_pending_age_s=None if oldest is None else max(0.0, now - float(oldest)),
        )

    def item(self, key: str) -> dict[str, Any] | None:
        """One item: state, attempts, last error, record and image (for tests and operators)."""
        row = (
            self.connection()
            .execute(
                "SELECT state, attempts, last_error, meta, image, image_type FROM items WHERE key = ?", (key,)
            )
            .fetchone()
        )
        if row is None:
            return None
        return {
            "state": row[0],
            "attempts": row[1],
            "last_error": row[2],
            "meta": json.loads(row[3]),
            "image": row[4],
            "image_type": row[5],
        }

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

"""Reviews of rejected inputs: the true label a person gave an outbox item, kept beside it.

A review lives in the outbox's SQLite file (table ``reviews``, one row per item key) so that an item
and its label are written and backed up together and a review cannot name an item that does not exist.
``label`` is a class index of the item's bundle, or NULL for "none of these classes" (an input the
CNN should never have been asked about). Reviewing again replaces the label: a person may correct a
slip, and the export and the live error estimate always use the latest word.

Without a fallback URL the review page *is* the fallback: recording a review then also marks the item
delivered, so the outbox's pending count (and its backlog alert) means "waiting for a person".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from models.operating_points import clopper_pearson_interval
from service.fallback.outbox import Outbox

SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    key TEXT PRIMARY KEY REFERENCES items (key),
    label INTEGER,
    reviewer TEXT,
    reviewed_at REAL NOT NULL,
    revisions INTEGER NOT NULL DEFAULT 1
);
"""


@dataclass(frozen=True)
class StoredItem:
    """An outbox item as the review page shows it: its record (prediction, evidence, explanation when
    the server computed one) and, once reviewed, the label given."""

    key: str
    created_at: float
    state: str
    meta: dict[str, Any]
    image_type: str
    label: int | None
    reviewed: bool
    reviewer: str | None
    reviewed_at: float | None


@dataclass(frozen=True)
class ReviewCounts:
    reviewed: int
    waiting: int
    none_of_these: int


@dataclass(frozen=True)
class RejectionEstimate:
    """What the reviews say about the gate's live ``unknown`` answers: the share of reviewed rejections
    the CNN really had wrong (its answer was not the true class, or no class fits), with an exact 95%
    interval. High: the gate rejects what it should; low: it sends right answers to the fallback."""

    reviewed: int
    wrong: int
    none_of_these: int
    wrong_rate: float | None
    wrong_rate_low: float
    wrong_rate_high: float


class ReviewStore:
    """Reads the outbox's items for review and records the labels people give them."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.outbox.connection().executescript(SCHEMA)

    _SELECT = (
        "SELECT i.key, i.created_at, i.state, i.meta, i.image_type, r.label, r.key IS NOT NULL, r.reviewer, "
        "r.reviewed_at FROM items i LEFT JOIN reviews r ON r.key = i.key "
    )

    @staticmethod
    def _item(row: tuple[Any, ...]) -> StoredItem:
        return StoredItem(
            key=row[0],
            created_at=row[1],
            state=row[2],
            meta=json.loads(row[3]),
            image_type=row[4],
            label=row[5],
            reviewed=bool(row[6]),
            reviewer=row[7],
            reviewed_at=row[8],
        )

    def waiting(self, limit: int, offset: int = 0) -> list[StoredItem]:
        """Items nobody has reviewed yet, oldest first (the order a queue is worked through)."""
        rows = (
            self.outbox.connection()
            .execute(
                self._SELECT + "WHERE r.key IS NULL ORDER BY i.created_at, i.rowid LIMIT ? OFFSET ?",
                (limit, offset),
            )
            .fetchall()
        )
        return [self._item(r) for r in rows]

    def reviewed(self, limit: int | None = None) -> list[StoredItem]:
        """Reviewed items, in the order they were reviewed (for the export and for refitting)."""
        rows = (
            self.outbox.connection()
            .execute(
                self._SELECT + "WHERE r.key IS NOT NULL ORDER BY r.reviewed_at, i.rowid LIMIT ?",
                (-1 if limit is None else limit,),
            )
            .fetchall()
        )
        return [self._item(r) for r in rows]

    def get(self, key: str) -> StoredItem | None:
        row = self.outbox.connection().execute(self._SELECT + "WHERE i.key = ?", (key,)).fetchone()
        return None if row is None else self._item(row)

    def image(self, key: str) -> tuple[bytes, str] | None:
        """The input as received (bytes and media type), or None for an unknown key."""
        row = (
            self.outbox.connection()
            .execute("SELECT image, image_type FROM items WHERE key = ?", (key,))
            .fetchone()
        )
        return None if row is None else (bytes(row[0]), str(row[1]))

    def record(
        self, key: str, label: int | None, reviewer: str | None, *, settle: bool, now: float | None = None
    ) -> StoredItem | None:
        """Store (or replace) the review of ``key``; None when there is no such item.

        ``settle``: the review page is the fallback (no fallback URL), so the item counts as delivered.
        """
        now = time.time() if now is None else now
        with self.outbox.transaction() as db:
            if db.execute("SELECT 1 FROM items WHERE key = ?", (key,)).fetchone() is None:
                return None
            db.execute(
                "INSERT INTO reviews (key, label, reviewer, reviewed_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET label = excluded.label, reviewer = excluded.reviewer, "
                "reviewed_at = excluded.reviewed_at, revisions = revisions + 1",
                (key, label, reviewer, now),
            )
            if settle:
                db.execute(
                    "UPDATE items SET state = 'delivered', delivered_at = ?, lease_until = 0 "
                    "WHERE key = ? AND state = 'pending'",
                    (now, key),
                )
        return self.get(key)

    def estimate(self) -> RejectionEstimate:
        """How many reviewed rejections were really wrong (see :class:`RejectionEstimate`)."""
        rows = (
            self.outbox.connection()
            .execute("SELECT r.label, i.meta FROM reviews r JOIN items i ON i.key = r.key")
            .fetchall()
        )
        predicted = [json.loads(meta).get("prediction", {}).get("label") for _, meta in rows]
        wrong = sum(
            label is None or label != guess for (label, _), guess in zip(rows, predicted, strict=True)
        )
        none = sum(label is None for label, _ in rows)
        low, high = clopper_pearson_interval(wrong, len(rows))
        return RejectionEstimate(
            reviewed=len(rows),
            wrong=wrong,
            none_of_these=none,
            wrong_rate=wrong / len(rows) if rows else None,
            wrong_rate_low=low,
            wrong_rate_high=high,
        )

    def counts(self) -> ReviewCounts:
        db = self.outbox.connection()
        reviewed, none_of_these = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(label IS NULL), 0) FROM reviews"
        ).fetchone()
        total = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        return ReviewCounts(
            reviewed=int(reviewed), waiting=int(total) - int(reviewed), none_of_these=int(none_of_these)
        )

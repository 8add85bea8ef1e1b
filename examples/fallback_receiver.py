"""A fallback receiver that honours predgate's ``Idempotency-Key``: each item takes effect once however
many times it is delivered. A starting point for a real one (a review queue, a bigger model), and the
receiver of the delivery tests, which can make it fail on purpose.

    python examples/fallback_receiver.py --port 9000 --db received.sqlite3
    PREDGATE_FALLBACK_URL=http://127.0.0.1:9000/items predgate serve --bundle ...

``POST /items`` stores the item under its key in one SQLite transaction (a key seen before is answered
200 and changes nothing), ``GET /items`` lists what was received. ``--fail-rate`` answers that share
of deliveries 503 before looking at them; ``--lost-ack-rate`` stores the item and then answers 500, as
if the acknowledgement were lost on the way back (the item comes again and must not count twice).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import random
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    key TEXT PRIMARY KEY, request_id TEXT, verdict TEXT, image_bytes INTEGER, first_at REAL,
    deliveries INTEGER
)
"""


class Store:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(SCHEMA)
        self.lock = threading.Lock()

    def apply(self, key: str, item: dict) -> bool:
        """Record one delivery; True when it took effect (first time for this key)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            seen = self.db.execute("SELECT 1 FROM received WHERE key = ?", (key,)).fetchone()
            if seen:
                self.db.execute("UPDATE received SET deliveries = deliveries + 1 WHERE key = ?", (key,))
            else:
                self.db.execute(
                    "INSERT INTO received VALUES (?, ?, ?, ?, ?, 1)",
                    (
                        key,
                        item.get("request_id"),
                        item["prediction"]["verdict"],
                        len(base64.b64decode(item["image"]["base64"], validate=True)),
                        time.time(),
                    ),
                )
            self.db.execute("COMMIT")
            return not seen

    def listing(self) -> dict:
        with self.lock:
            rows = self.db.execute(
                "SELECT key, request_id, verdict, image_bytes, deliveries FROM received"
            ).fetchall()
        return {
            k: {"request_id": r, "verdict": v, "image_bytes": b, "deliveries": d} for k, r, v, b, d in rows
        }


def make_handler(store: Store, fail_rate: float, lost_ack_rate: float, delay_s: float, rng: random.Random):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet: the tests read the store
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, store.listing()) if self.path == "/items" else self._send(
                404, {"error": "not found"}
            )

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.path != "/items":
                return self._send(404, {"error": "not found"})
            key = self.headers.get("Idempotency-Key")
            if not key:
                return self._send(400, {"error": "missing Idempotency-Key"})
            time.sleep(delay_s)
            if rng.random() < fail_rate:
                return self._send(503, {"error": "try later"})
            try:
                item = json.loads(body)
                took_effect = store.apply(key, item)
            except (ValueError, KeyError, TypeError, binascii.Error) as exc:
                return self._send(422, {"error": f"unreadable item: {exc}"})
            if rng.random() < lost_ack_rate:
                return self._send(500, {"error": "stored, but the acknowledgement is lost"})
            self._send(200, {"key": key, "new": took_effect})

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--db", type=Path, default=Path("received.sqlite3"))
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--lost-ack-rate", type=float, default=0.0)
    parser.add_argument("--delay-s", type=float, default=0.0, help="pause before answering each delivery")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    store = Store(args.db)
    handler = make_handler(store, args.fail_rate, args.lost_ack_rate, args.delay_s, random.Random(args.seed))
    server = ThreadingHTTPServer((args.host, args.port), handler)
    print(f"fallback receiver on http://{args.host}:{args.port}/items, store {args.db}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m service.fallback.admin --dir DIR status|dead|requeue``: look into an outbox and give its
dead-lettered items another round of attempts once the receiver is fixed. Safe while servers run (the
SQLite outbox is one file with transactions; the Redis one changes state in atomic scripts).
``--redis-url URL`` (and ``--redis-prefix``) for the Redis Streams outbox of several replicas."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from models.errors import ConfigError
from service.fallback.outbox import DB_FILE
from service.fallback.redis_outbox import DEFAULT_PREFIX
from service.fallback.store import open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.fallback.admin", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("data/fallback"), help="PREDGATE_FALLBACK_DIR")
    parser.add_argument("--redis-url", help="PREDGATE_FALLBACK_REDIS_URL (the Redis outbox instead of --dir)")
    parser.add_argument("--redis-prefix", default=DEFAULT_PREFIX, help="PREDGATE_FALLBACK_REDIS_PREFIX")
    parser.add_argument("command", choices=["status", "dead", "requeue"])
    args = parser.parse_args(argv)
    if args.redis_url is None and not (args.dir / DB_FILE).is_file():
        print(
            f"no outbox at {args.dir / DB_FILE}: give the server's PREDGATE_FALLBACK_DIR with --dir",
            file=sys.stderr,
        )
        return 2
    try:
        outbox = open_store(args.dir, args.redis_url, args.redis_prefix)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        if args.command == "status":
            print(json.dumps(asdict(outbox.counts()), indent=2))
        elif args.command == "dead":
            print(json.dumps(outbox.dead_items(), indent=2))
        else:
            print(f"requeued {outbox.requeue_dead()} dead item(s)")
    finally:
        outbox.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

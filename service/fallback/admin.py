"""``python -m service.fallback.admin --dir DIR status|dead|requeue``: look into an outbox and give its
dead-lettered items another round of attempts once the receiver is fixed. Safe while servers run (the
outbox is one SQLite file with transactions)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from service.fallback.outbox import DB_FILE, Outbox


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.fallback.admin", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("data/fallback"), help="PREDGATE_FALLBACK_DIR")
    parser.add_argument("command", choices=["status", "dead", "requeue"])
    args = parser.parse_args(argv)
    if not (args.dir / DB_FILE).is_file():
        print(f"no outbox at {args.dir / DB_FILE}: give the server's PREDGATE_FALLBACK_DIR with --dir", file=sys.stderr)
        return 2
    outbox = Outbox(args.dir)
    if args.command == "status":
        print(json.dumps(asdict(outbox.counts()), indent=2))
    elif args.command == "dead":
        print(json.dumps(outbox.dead_items(), indent=2))
    else:
        print(f"requeued {outbox.requeue_dead()} dead item(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

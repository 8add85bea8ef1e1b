"""``python -m bench.before_after``: two versions of the code side by side, from the JSON that
``bench.gate`` or ``bench.serve`` wrote for each (several runs per version, alternated on one machine).

Per stage and batch size (``bench.gate``), or per signal set and concurrency (``bench.serve``), it
takes the best of each version's runs (the run least disturbed by the rest of the machine) and their
spread, and the ratio after / before: below 1 is faster. Prints a markdown table; ``--out`` writes it
as JSON.

Example::

    python -m bench.before_after --kind gate --before b1.json b2.json --after a1.json a2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _gate_values(result: dict[str, Any]) -> dict[tuple[str, str], float]:
    """``(stage, batch size) -> ms per image`` of one ``bench.gate`` run."""
    out = {}
    for bs, batch in result["batches"].items():
        for stage, value in batch["stages"].items():
            if isinstance(value, dict) and "ms_per_image" in value:
                out[(stage, bs)] = float(value["ms_per_image"])
    return out


def _serve_values(result: dict[str, Any], stat: str) -> dict[tuple[str, str], float]:
    """``(signal set, concurrency) -> stat`` (e.g. ``p50_ms``) of one ``bench.serve`` run (batched)."""
    return {
        (str(row["signal_set"]), str(row["concurrency"])): float(row[stat])
        for row in result["results"]["batched"]
    }


def compare(
    before: list[dict[str, float]], after: list[dict[str, float]], lower_is_better: bool
) -> list[dict]:
    """Best and range of each version per key, and best after / best before."""
    keys = [k for k in before[0] if all(k in run for run in before + after)]
    pick = min if lower_is_better else max
    rows = []
    for key in keys:
        b = [run[key] for run in before]
        a = [run[key] for run in after]
        rows.append(
            {
                "key": list(key),
                "before_best": pick(b),
                "before_runs": b,
                "after_best": pick(a),
                "after_runs": a,
                "ratio_after_over_before": pick(a) / pick(b) if pick(b) else None,
            }
        )
    return rows


def table(rows: list[dict], labels: tuple[str, str], unit: str) -> str:
    header = f"| {labels[0]} | {labels[1]} | before {unit} (best; runs) | after {unit} (best; runs) "
    lines = [header + "| after / before |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        b = ", ".join(f"{v:.2f}" for v in r["before_runs"])
        a = ", ".join(f"{v:.2f}" for v in r["after_runs"])
        ratio = r["ratio_after_over_before"]
        lines.append(
            f"| {r['key'][0]} | {r['key'][1]} | {r['before_best']:.2f} ({b}) | {r['after_best']:.2f} ({a}) | "
            f"{ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.before_after", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=["gate", "serve"], required=True)
    parser.add_argument("--before", type=Path, nargs="+", required=True)
    parser.add_argument("--after", type=Path, nargs="+", required=True)
    parser.add_argument(
        "--stat", default="p50_ms", help="bench.serve column (p50_ms, p99_ms, throughput_rps, ...)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    runs = {side: [json.loads(p.read_text()) for p in getattr(args, side)] for side in ("before", "after")}
    if args.kind == "gate":
        values = {side: [_gate_values(r) for r in rs] for side, rs in runs.items()}
        rows = compare(values["before"], values["after"], lower_is_better=True)
        text = table(rows, ("stage", "batch"), "ms/img")
    else:
        values = {side: [_serve_values(r, args.stat) for r in rs] for side, rs in runs.items()}
        higher = args.stat.startswith("throughput")
        rows = compare(values["before"], values["after"], lower_is_better=not higher)
        text = table(rows, ("signal set", "concurrency"), args.stat)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"kind": args.kind, "stat": args.stat, "rows": rows}
        payload["before"] = [str(p) for p in args.before]
        payload["after"] = [str(p) for p in args.after]
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()

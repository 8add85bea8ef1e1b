"""``python -m bench.gate_threads``: the gate at each batch size on one torch intra-op thread and on
all of them, side by side, to set the service's ``single_thread_below`` (``PREDGATE_SINGLE_THREAD_BELOW``).

A batch too small to keep several threads busy pays their hand-offs instead: the crossover is the
smallest batch from which all threads win. Writes JSON (``--out``) and prints a table.

Example::

    python -m bench.gate_threads --bundle bundles/fashion-mnist-quick --signal-sets msp default
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bundle import load_bundle
from models.gate import load_gate


def median_ms(fn: Any, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after two untimed calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def measure(
    bundle_path: str | Path, batch_sizes: list[int], signal_sets: list[str], repeats: int, threads: int
) -> dict[str, Any]:
    """Per signal set and batch size: ms per batch of ``Gate.run`` on 1 and on ``threads`` threads."""
    bundle = load_bundle(bundle_path)
    gate = load_gate(bundle, "cpu")
    c, h, w = bundle.input_shape
    pixels = np.random.default_rng(0).integers(0, 256, (max(batch_sizes), h, w, c), dtype=np.uint8)
    rows = []
    for name in signal_sets:
        plan = gate.plan(None if name == "default" else name)
        for bs in batch_sizes:
            x = bundle.normalisation.apply(pixels[:bs])
            timed = {}
            for n in (1, threads):
                torch.set_num_threads(n)
                timed[n] = median_ms(lambda x=x, plan=plan: gate.run(x, plan=plan), repeats)
            rows.append(
                {
                    "signal_set": plan.set_name,
                    "batch_size": bs,
                    "ms_one_thread": timed[1],
                    "ms_all_threads": timed[threads],
                    "ratio_one_over_all": timed[1] / timed[threads],
                }
            )
    torch.set_num_threads(threads)
    return {
        "bundle": str(bundle.manifest["bundle_id"]),
        "threads": threads,
        "repeats": repeats,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor()},
        "rows": rows,
        "all_threads_win_from": crossover(rows),
    }


def crossover(rows: list[dict[str, Any]]) -> dict[str, int | None]:
    """Per signal set, the smallest measured batch from which all threads win at that batch and at
    every larger one (None: one thread wins at the largest batch measured)."""
    out: dict[str, int | None] = {}
    for name in sorted({r["signal_set"] for r in rows}):
        ordered = sorted((r for r in rows if r["signal_set"] == name), key=lambda r: r["batch_size"])
        start = None
        for row in ordered:
            if row["ratio_one_over_all"] > 1.0:
                start = row["batch_size"] if start is None else start
            else:
                start = None
        out[name] = start
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        f"| signal set | batch | 1 thread ms | {result['threads']} threads ms | 1 / {result['threads']} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['signal_set']} | {r['batch_size']} | {r['ms_one_thread']:.2f} | "
            f"{r['ms_all_threads']:.2f} | {r['ratio_one_over_all']:.2f} |"
        )
    lines.append("")
    for name, size in sorted(result["all_threads_win_from"].items()):
        lines.append(
            f"- {name}: all threads win from batch {size}" if size else f"- {name}: one thread always wins"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gate_threads", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument(
        "--signal-sets", nargs="+", default=["msp", "default"], help="'default' = the bundle's"
    )
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="the 'all threads' count"
    )
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = measure(args.bundle, args.batch_sizes, args.signal_sets, args.repeats, args.threads)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()

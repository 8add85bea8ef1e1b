"""``python -m bench.ray_features``: feature extraction single-process against ``--engine ray``.

Runs ``predgate features`` twice on copies of a bundle in which one split's features are cleared:
once in this process's way (``--engine local``, torch's default threads) and once on a local Ray
instance (``--engine ray``, ``--ray-actors`` actors of one CPU each). Reports images per second of
the extraction itself (the manifest's stage seconds), the command's wall time (Ray's start-up
included), and whether the two feature tables are equal (labels exactly, floats within 1e-5).

    python -m bench.ray_features --bundle bundles/fashion-mnist-quick --split test \\
        --out reports/scaling/ray-features.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import finish
from models.bundle import load_bundle, load_features

EXACT = ("label", "prediction", "mutant_labels", "mutants_used")
CLOSE = ("logits", "conductance", "lcr", "lcr_full")


def cleared_copy(bundle: Path, out: Path, split: str) -> Path:
    """``bundle`` copied to ``out`` with ``split``'s features (and the LCR setting) to be redone."""
    shutil.copytree(bundle, out)
    copy = load_bundle(out)
    for stage in (f"features:{split}", "features:lcr"):
        copy.manifest["stages"].pop(stage, None)
    copy.save()
    return out


def run_features(bundle: Path, split: str, batch_size: int, engine_args: list[str]) -> dict[str, Any]:
    """One ``predgate features`` run; its wall time and the stage's own seconds."""
    command = [
        sys.executable,
        "-m",
        "cli.main",
        "features",
        "--bundle",
        str(bundle),
        "--batch-size",
        str(batch_size),
    ]
    start = time.perf_counter()
    subprocess.run([*command, *engine_args], check=True, env={**os.environ, "PREDGATE_NO_PROGRESS": "1"})
    wall = time.perf_counter() - start
    info = load_bundle(bundle).manifest["stages"][f"features:{split}"]
    return {
        "engine_args": engine_args,
        "images": int(info["images"]),
        "seconds": float(info["seconds"]),
        "wall_s": wall,
        "images_per_s": float(info["images"]) / float(info["seconds"]),
    }


def compare(a: Path, b: Path, split: str) -> dict[str, Any]:
    """Whether two bundles' features of ``split`` are equal, and the largest float difference."""
    left, right = load_features(load_bundle(a))[split], load_features(load_bundle(b))[split]
    exact = all(np.array_equal(left[k], right[k]) for k in EXACT if k in left)
    diff = max(float(np.abs(left[k].astype(np.float64) - right[k]).max()) for k in CLOSE if k in left)
    return {"labels_equal": exact, "max_float_diff": diff, "equal": exact and diff <= 1e-5}


def render(result: dict[str, Any]) -> str:
    rows = [
        "| engine | images | extraction s | images/s | command wall s (start-up included) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("local", "ray"):
        r = result[name]
        rows.append(
            f"| {name} {' '.join(r['engine_args'])} | {r['images']} | {r['seconds']:.1f} | "
            f"{r['images_per_s']:.1f} | {r['wall_s']:.1f} |"
        )
    eq = result["equality"]
    rows.append("")
    rows.append(
        f"ray / local images/s: **{result['ratio']:.2f}x**; results equal: {eq['equal']} "
        f"(labels equal {eq['labels_equal']}, max float difference {eq['max_float_diff']:.2e})"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ray_features", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--split", default="test", choices=["fit", "val", "test"])
    parser.add_argument("--batch-size", type=int, default=128, help="images per chunk, both engines")
    parser.add_argument("--ray-actors", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="predgate-ray-bench-") as tmp:
        local = cleared_copy(args.bundle, Path(tmp) / "local", args.split)
        on_ray = cleared_copy(args.bundle, Path(tmp) / "ray", args.split)
        result: dict[str, Any] = {
            "bundle": str(args.bundle),
            "split": args.split,
            "batch_size": args.batch_size,
            "cpus": os.cpu_count(),
            "n_mutants": (load_bundle(args.bundle).get("mutants") or {}).get("count"),
            "local": run_features(local, args.split, args.batch_size, []),
            "ray": run_features(
                on_ray, args.split, args.batch_size, ["--engine", "ray", "--ray-actors", str(args.ray_actors)]
            ),
        }
        result["equality"] = compare(local, on_ray, args.split)
    result["ratio"] = result["ray"]["images_per_s"] / result["local"]["images_per_s"]
    code = finish(result, "bench.ray_features", argv, args.out, render)
    return code if result["equality"]["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())

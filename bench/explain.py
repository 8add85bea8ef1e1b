"""``python -m bench.explain``: milliseconds per image of each explanation method, next to a plain forward.

Each method's whole explanation (:meth:`models.explanations.Explainer.explain`: two conductance passes
for the predicted class and the runner-up, the attribution, the overlay and feature-map PNGs) is timed
on test images of the bundle at each batch size, as the median of ``--repeats`` runs, with a plain
forward pass of the same batch for scale (ratios travel between machines, milliseconds do not).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from bench.common import finish
from models.bundle import load_bundle
from models.costs import median_seconds
from models.data import load_splits
from models.explanations import DEFAULT_IG_STEPS, METHODS, Explainer
from models.gate import load_gate


def measure(bundle_dir: Path, batch_sizes: list[int], repeats: int, ig_steps: int) -> dict:
    """Median milliseconds per image per method and batch size, and the forward pass's."""
    bundle = load_bundle(bundle_dir)
    gate = load_gate(bundle, "cpu")
    explainer = Explainer.from_gate(gate, bundle, ig_steps=ig_steps)
    images = load_splits(bundle)["test"].images[: max(batch_sizes)]
    rows: dict[str, dict[str, float]] = {}
    for n in batch_sizes:
        x = bundle.normalisation.apply(images[:n])
        with torch.no_grad():
            forward = median_seconds(lambda x=x: explainer.model(x), repeats)
        row = {"forward_ms": 1000.0 * forward / n}
        for method in METHODS:
            took = median_seconds(lambda x=x, method=method: explainer.explain(x, method), repeats)
            row[f"{method}_ms"] = 1000.0 * took / n
        rows[str(n)] = row
    return {
        "bundle": str(bundle_dir),
        "architecture": bundle.manifest["architecture"]["name"],
        "input_shape": list(bundle.input_shape),
        "ig_steps": ig_steps,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "per_image_ms": rows,
    }


def render(result: dict) -> str:
    title = (
        f"explanations, {result['architecture']} {result['input_shape']}, IG {result['ig_steps']} steps, "
        f"{result['torch_threads']} torch thread(s); ms per image (median)"
    )
    lines = [
        title,
        "batch  forward  " + "  ".join(METHODS),
    ]
    for n, row in result["per_image_ms"].items():
        cells = "  ".join(f"{row[f'{m}_ms']:{len(m)}.1f}" for m in METHODS)
        lines.append(f"{n:>5}  {row['forward_ms']:7.2f}  {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ig-steps", type=int, default=DEFAULT_IG_STEPS)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.bundle, args.batch_sizes, args.repeats, args.ig_steps)
    return finish(result, "bench.explain", argv, args.out, render)


if __name__ == "__main__":
    raise SystemExit(main())

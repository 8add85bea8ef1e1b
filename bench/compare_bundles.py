"""``python -m bench.compare_bundles``: is a cheaper LCR setting worth adopting?

Two finished bundles on the same CNN and splits (e.g. the full profile and the same profile with
``--mutant-modules layer3 --lcr-sprt 0.01``) are compared signal set by signal set: val and test
AUROC of each, the paired bootstrap CI of the test difference (same images, so the pairing is
exact), and the cost in forward-equivalents each bundle's report measured. The verdict follows the
performance issue's rule: adopt where the AUROC loss is at most ``--max-loss`` on val.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import finish
from models.bundle import (
    REPORT_METRICS_FILE,
    SCORES_FILE,
    Bundle,
    DetectorsSection,
    load_bundle,
    load_features,
    scores_key,
)
from models.metrics import auroc, paired_bootstrap_auroc, wrong_labels


def _scores(path: Path) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    bundle = load_bundle(path)
    metrics_file = bundle.path / REPORT_METRICS_FILE
    if not metrics_file.is_file():
        raise SystemExit(f"{path}: no {REPORT_METRICS_FILE}; finish the build first")
    return bundle, bundle.read_arrays(SCORES_FILE), json.loads(metrics_file.read_text())


def _detectors(bundle: Bundle) -> DetectorsSection:
    if bundle.detectors is None:
        raise SystemExit(f"{bundle.path}: no detectors section; finish the build first")
    return bundle.detectors


def compare(a: Path, b: Path, n_boot: int = 1000, max_loss: float = 0.005) -> dict[str, Any]:
    bundle_a, scores_a, metrics_a = _scores(a)
    bundle_b, scores_b, metrics_b = _scores(b)
    feats = load_features(bundle_a, ("val", "test"))
    for split, f in feats.items():
        other = bundle_b.read_features(split)
        if not (
            np.array_equal(f["label"], other["label"])
            and np.array_equal(f["prediction"], other["prediction"])
        ):
            raise SystemExit(
                f"{a} and {b} differ in {split} labels or predictions: not the same CNN and splits"
            )
    wrong = {s: wrong_labels(f) for s, f in feats.items()}
    cost_a = {r["signal_set"]: r["cost_fe"] for r in metrics_a["evidence_value"]}
    cost_b = {r["signal_set"]: r["cost_fe"] for r in metrics_b["evidence_value"]}
    rows = []
    sets_a, sets_b = (_detectors(bundle).signal_sets for bundle in (bundle_a, bundle_b))
    for name in sets_a:
        if name not in sets_b:
            continue
        val, test = scores_key(0, name, "val"), scores_key(0, name, "test")
        val_a, val_b = (auroc(s[val], wrong["val"]) for s in (scores_a, scores_b))
        boot = paired_bootstrap_auroc(scores_b[test], scores_a[test], wrong["test"], n_boot=n_boot)
        rows.append(
            {
                "signal_set": name,
                "val_auroc_a": val_a,
                "val_auroc_b": val_b,
                "val_loss": val_a - val_b,
                "test_auroc_a": boot["auroc_b"],
                "test_auroc_b": boot["auroc_a"],
                "test_diff": boot["diff"],
                "test_ci_diff": list(boot["ci_diff"]),
                "cost_fe_a": cost_a.get(name),
                "cost_fe_b": cost_b.get(name),
                "adopt": bool(val_a - val_b <= max_loss),
            }
        )
    lcr = {
        side: (bundle.manifest.get("lcr") or {})
        | {"mutants": bundle.manifest.get("mutants", {}).get("modules")}
        for side, bundle in (("a", bundle_a), ("b", bundle_b))
    }
    return {
        "a": str(a),
        "b": str(b),
        "n_boot": n_boot,
        "max_loss": max_loss,
        "lcr_settings": lcr,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        (
            f"a = `{result['a']}`, b = `{result['b']}`; loss = val AUROC a - b (adopt b where <= "
            f"{result['max_loss']}); test difference b - a with a paired {result['n_boot']}-resample "
            "bootstrap 95% CI."
        ),
        "",
        (
            "| signal set | val AUROC a | val AUROC b | val loss | test AUROC a | test AUROC "
            "b | test diff b - a [95% CI] | cost a (fwd-eq) | cost b (fwd-eq) | loss <= max |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ci = r["test_ci_diff"]
        cost = [f"{c:.1f}" if c is not None else "–" for c in (r["cost_fe_a"], r["cost_fe_b"])]
        lines.append(
            f"| {r['signal_set']} | {r['val_auroc_a']:.4f} | {r['val_auroc_b']:.4f} | {r['val_loss']:+.4f} | "
            f"{r['test_auroc_a']:.4f} | {r['test_auroc_b']:.4f} | {r['test_diff']:+.4f} [{ci[0]:+.4f}, "
            f"{ci[1]:+.4f}] | {cost[0]} | {cost[1]} | {'yes' if r['adopt'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare_bundles", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--a", type=Path, required=True, help="reference bundle (e.g. the full LCR)")
    parser.add_argument("--b", type=Path, required=True, help="candidate bundle (the cheaper setting)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--max-loss", type=float, default=0.005)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    return finish(
        compare(args.a, args.b, args.n_boot, args.max_loss), "bench.compare_bundles", argv, args.out, markdown
    )


if __name__ == "__main__":
    raise SystemExit(main())

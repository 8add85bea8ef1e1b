"""``python -m offline.summary``: several finished bundles' paper comparisons in one markdown table.

The CIFAR-10 reproduction has two detector settings on one CNN (a held-out fit split, and the
paper's detectors trained on the CNN's own training images); each bundle's report holds its own
comparison (:func:`offline.report.paper_comparison`), and this puts them side by side, row by row,
with the paper's figures, so the summary is regenerated from the bundles rather than typed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from models.bundle import REPORT_METRICS_FILE, load_bundle
from offline.markdown import fit_source, fmt, interval, signed_ci


def _setting(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=BUNDLE_DIR, got {spec!r}")
    return name, Path(path)


def load_setting(path: Path) -> dict[str, Any]:
    """The bundle's manifest facts and its report's metrics (the report must have been written)."""
    bundle = load_bundle(path)
    metrics_file = bundle.path / REPORT_METRICS_FILE
    if not metrics_file.is_file():
        raise SystemExit(f"{path}: no {REPORT_METRICS_FILE}; finish the build first (predgate build)")
    metrics = json.loads(metrics_file.read_text())
    if "paper_comparison" not in metrics:
        raise SystemExit(
            f"{path}: the report predates the paper comparison; rewrite it (predgate report --bundle {path})"
        )
    return {"manifest": bundle.manifest, "detectors": bundle.detectors, "metrics": metrics}


def describe(name: str, setting: dict[str, Any]) -> str:
    man, m = setting["manifest"], setting["metrics"]
    training, mut = man.get("training", {}), man.get("mutants", {})
    stopping = (man.get("lcr") or {}).get("early_stopping")
    cond = man.get("conductance", {})
    detectors = setting["detectors"]
    with_class = detectors is not None and detectors.conductance.inputs == "conductance+class"
    return (
        f"- **{name}** (`{man['bundle_id']}`): CNN test accuracy {fmt(training.get('test_accuracy'))} "
        f"(val {fmt(training.get('val_accuracy'))}, {man['profile']['epochs']} epochs); "
        f"{mut.get('count')} {mut.get('operator')} mutants at rate {mut.get('rate')} "
        f"({', '.join(map(str, mut.get('filters_per_mutant', [])))} filters each"
        f"{', in ' + ', '.join(mut['modules']) if mut.get('modules') else ''}); "
        f"conductance at `{cond.get('layer')}` ({cond.get('mode')} form)"
        f"{', its detector also reads the predicted class' if with_class else ''}; "
        f"splits {', '.join(f'{k} {v}' for k, v in m['splits'].items())}; detectors trained on "
        f"{fit_source(man)}{'; LCR stops early' if stopping else ''}."
    )


def summary_markdown(settings: dict[str, dict[str, Any]]) -> str:
    names = list(settings)
    head = ["method", "paper val AUROC", "paper test recall c / w"]
    for name in names:
        head += [
            f"{name}: val AUROC",
            f"{name}: test AUROC [95% CI]",
            f"{name}: diff to MSP [95% CI]",
            f"{name}: test recall c / w",
        ]
    lines = [
        *(describe(n, s) for n, s in settings.items()),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    first = settings[names[0]]["metrics"]["paper_comparison"]
    for i, ref in enumerate(first):
        row = [
            ref["label"],
            fmt(ref["paper_val_auroc"], 3) if ref["paper_val_auroc"] is not None else "–",
            f"{ref['paper_test_recall_correct']:.3f} / {ref['paper_test_recall_wrong']:.3f}"
            if ref["paper_test_recall_correct"] is not None
            else "–",
        ]
        for name in names:
            rows = {r["label"]: r for r in settings[name]["metrics"]["paper_comparison"]}
            r = rows.get(ref["label"])
            if r is None:
                row += ["–"] * 4
                continue
            row += [
                fmt(r["val_auroc"], 3),
                f"{fmt(r['test_auroc'])} {interval(r['test_ci'])}",
                f"{r['diff_to_msp']:+.4f} {signed_ci(r['ci_diff_to_msp'])}",
                f"{fmt(r['test_recall_correct'], 3)} / {fmt(r['test_recall_wrong'], 3)}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offline.summary", description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", type=_setting, help="NAME=BUNDLE_DIR, in column order")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    settings = {name: load_setting(path) for name, path in args.settings}
    text = summary_markdown(settings)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The evaluation report's figures: which scores each PNG shows, under which title and file name.

:mod:`offline.report` computes the numbers (``report/metrics.json``) and writes the markdown; this
module draws the figures from the same numbers, through the plotting functions of
:mod:`offline.plots` (which the other reports share). The markdown links the figures by the file
names defined here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from offline import plots

ROC_FIGURE = "roc.png"
RISK_COVERAGE_FIGURE = "risk_coverage.png"
CONFUSION_FIGURE = "confusion.png"
FALLBACK_FIGURE = "fallback.png"
LCR_VS_MUTANTS_FIGURE = "lcr_vs_mutants.png"
"""Drawn only when the bundle kept every mutant's labels (``metrics["lcr_vs_mutants"]``)."""
AUROC_VS_COST_FIGURE = "auroc_vs_cost.png"
"""Drawn only when the costs were measured (``metrics["costs"]``)."""


def write_figures(
    out: Path, metrics: dict[str, Any], scores: dict[str, dict[str, np.ndarray]], wrong_test: np.ndarray
) -> None:
    """Draw the report's PNGs into ``out``.

    Parameters
    ----------
    out : the bundle's report folder.
    metrics : what :func:`offline.report.write_report` writes to ``report/metrics.json``.
    scores : scores per method per split (:func:`offline.report.method_scores`); the ROC and
        risk-coverage curves show the default set, the conductance detector, raw LCR and the best
        softmax baseline on test, those of them that exist.
    wrong_test : test labels, 1 where the CNN's prediction is wrong.
    """
    default_set, best_baseline = metrics["default_set"], metrics["best_baseline"]
    gate_name = f"set {default_set}"
    curves = {
        n: scores[n]["test"] for n in (gate_name, "conductance", "lcr (raw)", best_baseline) if n in scores
    }
    plots.plot_roc(curves, wrong_test, out / ROC_FIGURE, "ROC on test: detecting wrong predictions")
    plots.plot_risk_coverage(curves, wrong_test, out / RISK_COVERAGE_FIGURE, "risk-coverage on test")
    plots.plot_confusion(
        np.array(metrics["confusion_test"]), out / CONFUSION_FIGURE, f"{default_set} at equal-recall (test)"
    )
    plots.plot_fallback(
        [(r["method"], r["accuracy"], r["accuracy_with_fallback"]) for r in metrics["fallback"]],
        out / FALLBACK_FIGURE,
    )
    curve = metrics["lcr_vs_mutants"]
    if curve:
        plots.plot_lcr_vs_mutants(
            curve["count"],
            curve["auroc"],
            curve["std"],
            metrics["methods"]["msp"]["val"]["auroc"],
            out / LCR_VS_MUTANTS_FIGURE,
        )
    if metrics["costs"]:
        plots.plot_auroc_vs_cost(
            [(r["signal_set"], r["cost_fe"], r["test_auroc"]) for r in metrics["evidence_value"]],
            out / AUROC_VS_COST_FIGURE,
        )

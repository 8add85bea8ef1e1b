"""Plotting functions of the evaluation and review reports, one per kind of figure (PNG,
matplotlib's Agg backend so no display is needed). Which figures a report shows, from which scores,
is the report's own choice: :mod:`offline.report_figures`, :mod:`offline.review_report`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from models.metrics import risk_coverage_curve


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(curves: dict[str, np.ndarray], wrong: np.ndarray, path: Path, title: str) -> None:
    """ROC of each score for detecting wrong predictions (the paper's Fig. 5)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, scores in curves.items():
        fpr, tpr, _ = roc_curve(wrong, scores)
        ax.plot(fpr, tpr, label=name, lw=1.4)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate (correct predictions rejected)")
    ax.set_ylabel("true positive rate (wrong predictions rejected)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_risk_coverage(curves: dict[str, np.ndarray], wrong: np.ndarray, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, scores in curves.items():
        coverage, risk = risk_coverage_curve(scores, wrong)
        ax.plot(coverage, risk, label=name, lw=1.4)
    ax.set_xlabel("coverage (share of inputs accepted)")
    ax.set_ylabel("risk (error rate among accepted)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def plot_lcr_vs_mutants(
    counts: list[int], aurocs: list[float], spreads: list[float], baseline: float, path: Path
) -> None:
    """Val AUROC of LCR against the number of mutants (the paper's Fig. 4)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar(counts, aurocs, yerr=spreads, marker="o", capsize=3, label="LCR")
    ax.axhline(baseline, color="grey", ls="--", lw=1, label="MSP (same model)")
    ax.set_xscale("log")
    ax.set_xlabel("number of mutants")
    ax.set_ylabel("val AUROC")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_confusion(counts: np.ndarray, path: Path, title: str) -> None:
    """2 x 2 counts: rows = prediction correct / wrong, columns = accepted / rejected (Fig. 6)."""
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.imshow(counts, cmap="Blues")
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=12)
    ax.set_xticks([0, 1], ["accept", "unknown"])
    ax.set_yticks([0, 1], ["correct", "wrong"])
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def plot_fallback(rows: list[tuple[str, float, float]], path: Path) -> None:
    """Accuracy of the CNN alone vs with every rejected input resolved by the fallback."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = [r[0] for r in rows]
    ax.barh(names, [r[1] for r in rows], color="#9ecae1", label="CNN alone")
    ax.barh(
        names, [r[2] - r[1] for r in rows], left=[r[1] for r in rows], color="#3182bd", label="with fallback"
    )
    low = min(r[1] for r in rows)
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel("test accuracy")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_auroc_vs_cost(points: list[tuple[str, float, float]], path: Path) -> None:
    """Test AUROC against forward-equivalents per image; the Pareto front is drawn."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    costs = np.array([p[1] for p in points])
    aurocs = np.array([p[2] for p in points])
    ax.scatter(costs, aurocs)
    for name, cost, value in points:
        ax.annotate(name, (cost, value), fontsize=8, xytext=(4, 2), textcoords="offset points")
    order = np.argsort(costs)
    front_x, front_y, best = [], [], -np.inf
    for i in order:
        if aurocs[i] > best:
            best = aurocs[i]
            front_x.append(costs[i])
            front_y.append(aurocs[i])
    front_x.append(float(costs.max()))  # the front stays flat out to the most expensive set
    front_y.append(front_y[-1])
    ax.step(front_x, front_y, where="post", color="grey", lw=1, ls="--", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("forward-equivalents per image (measured)")
    ax.set_ylabel("test AUROC")
    ax.legend(fontsize=8)
    _save(fig, path)

"""The evaluation report's figures (:mod:`offline.report_figures`), drawn from a metrics dict and
scores alone: the four figures always, the LCR and cost figures only when their numbers exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offline.report_figures import (
    AUROC_VS_COST_FIGURE,
    CONFUSION_FIGURE,
    FALLBACK_FIGURE,
    LCR_VS_MUTANTS_FIGURE,
    RISK_COVERAGE_FIGURE,
    ROC_FIGURE,
    write_figures,
)

ALWAYS = {ROC_FIGURE, RISK_COVERAGE_FIGURE, CONFUSION_FIGURE, FALLBACK_FIGURE}


def _inputs(with_optional: bool) -> tuple[dict, dict, np.ndarray]:
    rng = np.random.default_rng(0)
    wrong = (rng.random(200) < 0.2).astype(np.int64)
    scores = {name: {"test": wrong + rng.normal(size=200)} for name in ("set cond+lcr", "conductance", "msp")}
    metrics = {
        "default_set": "cond+lcr",
        "best_baseline": "msp",
        "confusion_test": [[150, 10], [12, 28]],
        "fallback": [
            {"method": "set cond+lcr", "accuracy": 0.8, "accuracy_with_fallback": 0.95, "coverage": 0.8},
            {"method": "msp", "accuracy": 0.8, "accuracy_with_fallback": 0.9, "coverage": 0.8},
        ],
        "methods": {"msp": {"val": {"auroc": 0.8}}},
        "lcr_vs_mutants": {"count": [1, 5], "auroc": [0.6, 0.7], "std": [0.05, 0.01]}
        if with_optional
        else None,
        "costs": {"forward": 1.0} if with_optional else None,
        "evidence_value": [
            {"signal_set": "cond+lcr", "cost_fe": 51.0, "test_auroc": 0.9},
            {"signal_set": "msp", "cost_fe": 1.0, "test_auroc": 0.85},
        ],
    }
    return metrics, scores, wrong


def test_every_figure_is_drawn_when_its_numbers_exist(tmp_path: Path) -> None:
    metrics, scores, wrong = _inputs(with_optional=True)
    write_figures(tmp_path, metrics, scores, wrong)
    drawn = {p.name for p in tmp_path.iterdir()}
    assert drawn == ALWAYS | {LCR_VS_MUTANTS_FIGURE, AUROC_VS_COST_FIGURE}
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in drawn)


def test_lcr_and_cost_figures_need_their_numbers(tmp_path: Path) -> None:
    metrics, scores, wrong = _inputs(with_optional=False)
    write_figures(tmp_path, metrics, scores, wrong)
    assert {p.name for p in tmp_path.iterdir()} == ALWAYS

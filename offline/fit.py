"""Fit the conductance detector and one unified classifier per signal set; choose on val.

Stacking without leakage: the unified classifier is fitted on the fit split, where the conductance
detector's own training data lives, so its ``cond`` column there is out-of-fold (k-fold
cross-fitting). On val and test the detector trained on the whole fit split is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from models.detectors import UNIFIED_KINDS, ConductanceDetector, UnifiedClassifier
from models.errors import ConfigError
from models.metrics import auroc, wrong_labels
from models.signals import CANDIDATE_SETS, OPEN_WORLD_SIGNALS, conductance_inputs, needs_lcr, signal_matrix

log = logging.getLogger("predgate.fit")

SPLITS = ("fit", "val", "test")


@dataclass
class SetFit:
    """One signal set: every kind tried (val AUROC), the kind chosen, and its scores per split."""

    name: str
    signals: tuple[str, ...]
    val_auroc_by_kind: dict[str, float]
    kind: str
    classifier: UnifiedClassifier
    scores: dict[str, np.ndarray]
    scores_by_kind: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class DetectorFit:
    """Everything the detectors stage produced for one seed."""

    seed: int
    cond_detector: ConductanceDetector
    cond_scores: dict[str, np.ndarray]  # fit scores are out-of-fold
    sets: dict[str, SetFit] = field(default_factory=dict)


def _usable(features: dict[str, dict[str, np.ndarray]], signals: tuple[str, ...]) -> bool:
    """A set is fitted only where every split has its evidence (LCR needs mutants; the open-world
    signals need their precomputed columns)."""
    if needs_lcr(signals) and not all("lcr" in features[s] for s in SPLITS):
        return False
    return all(name in features[s] for name in signals if name in OPEN_WORLD_SIGNALS for s in SPLITS)


def out_of_fold_scores(
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    folds: int,
    seed: int,
    **params: Any,
) -> np.ndarray:
    """Conductance-detector scores on the fit split from detectors that never saw each row."""
    scores = np.empty(len(x), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train_idx, held_idx in splitter.split(x, y):
        detector = ConductanceDetector(seed=seed, **params).fit(x[train_idx], y[train_idx], x_val, y_val)
        scores[held_idx] = detector.decision_function(x[held_idx])
    return scores


def fit_detectors(
    features: dict[str, dict[str, np.ndarray]],
    *,
    seed: int = 0,
    signal_sets: dict[str, tuple[str, ...]] | None = None,
    kinds: tuple[str, ...] = UNIFIED_KINDS,
    chosen_kinds: dict[str, str] | None = None,
    folds: int = 5,
    cond_params: dict[str, Any] | None = None,
    cond_inputs: str = "conductance",
    progress: bool = True,
) -> DetectorFit:
    """Fit everything for one seed.

    ``kinds`` are tried for every set and the best on val AUROC is kept; ``chosen_kinds`` (set name
    -> kind) refits only the kind an earlier seed chose, to measure the spread across seeds.
    ``cond_inputs`` says what the conductance detector reads (:data:`models.signals.COND_INPUTS`).
    """
    cond_params = cond_params or {}
    signal_sets = signal_sets or CANDIDATE_SETS
    wrong = {s: wrong_labels(features[s]) for s in SPLITS}
    if wrong["fit"].sum() < folds or wrong["val"].sum() == 0:
        raise ConfigError(
            f"too few wrong predictions to fit detectors (fit: {int(wrong['fit'].sum())}, "
            f"val: {int(wrong['val'].sum())}); use larger fit/val splits"
        )
    num_classes = features["fit"]["logits"].shape[1]
    cond = {
        s: conductance_inputs(features[s]["conductance"], features[s]["prediction"], cond_inputs, num_classes)
        for s in SPLITS
    }
    detector = ConductanceDetector(seed=seed, **cond_params).fit(
        cond["fit"], wrong["fit"], cond["val"], wrong["val"]
    )
    cond_scores = {
        "fit": out_of_fold_scores(
            cond["fit"], wrong["fit"], cond["val"], wrong["val"], folds=folds, seed=seed, **cond_params
        ),
        "val": detector.decision_function(cond["val"]),
        "test": detector.decision_function(cond["test"]),
    }
    result = DetectorFit(seed=seed, cond_detector=detector, cond_scores=cond_scores)
    names = [n for n, sig in signal_sets.items() if _usable(features, sig)]
    for name in tqdm(names, desc=f"signal sets (seed {seed})", disable=not progress):
        signals = signal_sets[name]
        x = {
            s: signal_matrix(
                signals, features[s]["logits"], cond_scores[s], features[s].get("lcr"), extra=features[s]
            )
            for s in SPLITS
        }
        by_kind: dict[str, float] = {}
        fitted: dict[str, UnifiedClassifier] = {}
        for kind in (chosen_kinds[name],) if chosen_kinds else kinds:
            clf = UnifiedClassifier(kind=kind, seed=seed).fit(x["fit"], wrong["fit"], x["val"], wrong["val"])
            fitted[kind] = clf
            by_kind[kind] = auroc(clf.decision_function(x["val"]), wrong["val"])
        best = max(by_kind, key=lambda k: (by_kind[k], -UNIFIED_KINDS.index(k)))
        by_kind_scores = {k: {s: clf.decision_function(x[s]) for s in SPLITS} for k, clf in fitted.items()}
        result.sets[name] = SetFit(
            name, signals, by_kind, best, fitted[best], by_kind_scores[best], by_kind_scores
        )
    return result

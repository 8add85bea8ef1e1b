"""The pieces of evidence a verdict can rest on, and the named sets of them a bundle offers.

Each signal is one number per image, "higher or lower may mean wrong" (the unified classifier learns
which). What a signal costs decides what the gate must compute: ``cond`` needs the conductance
vector and its detector, ``lcr`` the mutant ensemble, the softmax signals only the logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.errors import ConfigError
from models.scores import doctor, entropy, margin, msp_score

SOFTMAX_SIGNALS = {"msp": msp_score, "entropy": entropy, "margin": margin, "doctor": doctor}
# Open-world signals, computed from fitted scorers (models.feature_scores, models.fitted_scores,
# models.input_perturbation) and handed to signal_matrix as precomputed columns: "maha" and "knn"
# read the penultimate features, "doctor_pert" needs one gradient step, the rest only the logits.
OPEN_WORLD_SIGNALS = ("maxlogit", "energy", "pnorm", "relu", "doctor_pert", "maha", "knn")
SIGNALS = ("cond", "lcr", *SOFTMAX_SIGNALS, *OPEN_WORLD_SIGNALS)

# Candidate sets fitted at build time. "cond+lcr" is the paper's unified classifier; "softmax" is the
# control for "all": a gain of "all" over MSP that "softmax" also shows is not the gate's evidence.
CANDIDATE_SETS: dict[str, tuple[str, ...]] = {
    "msp": ("msp",),
    "cond": ("cond",),
    "lcr": ("lcr",),
    "cond+lcr": ("cond", "lcr"),
    "cond+msp": ("cond", "msp"),
    "cond+lcr+msp": ("cond", "lcr", "msp"),
    "all": ("cond", "lcr", "msp", "entropy", "margin"),
    "softmax": ("msp", "entropy", "margin"),
}
PAPER_SET = "cond+lcr"

# Sets measured by the open-world evaluation (offline.open_world): each new signal alone, softmax
# with feature distances (SIRC's combination, Xia & Bouganis 2022), the paper's evidence with them,
# and everything. "feat+softmax" costs one forward pass; sets with "doctor_pert" about four.
OPEN_WORLD_SETS: dict[str, tuple[str, ...]] = {
    "doctor": ("doctor",),
    "maxlogit": ("maxlogit",),
    "energy": ("energy",),
    "pnorm": ("pnorm",),
    "relu": ("relu",),
    "doctor_pert": ("doctor_pert",),
    "maha": ("maha",),
    "knn": ("knn",),
    "msp+maha+knn": ("msp", "maha", "knn"),
    "feat+softmax": ("msp", "entropy", "margin", "energy", "maha", "knn"),
    "cond+feat+softmax": ("cond", "msp", "entropy", "margin", "energy", "maha", "knn"),
    "cond+lcr+maha+knn": ("cond", "lcr", "maha", "knn"),
    "everything": (
        "cond",
        "lcr",
        "msp",
        "entropy",
        "margin",
        "energy",
        "pnorm",
        "relu",
        "doctor_pert",
        "maha",
        "knn",
    ),
}


# What the conductance detector reads. "conductance" is the paper's (the C per-channel values);
# "conductance+class" appends the predicted class one-hot: the same conductance pattern can mean
# "confident" for one class and "doubtful" for another, and the detector cannot tell which class
# it is looking at from conductance alone (the last-stage conductance is w_pred * pooled features).
COND_INPUTS = ("conductance", "conductance+class")


def check_cond_inputs(inputs: str) -> str:
    if inputs not in COND_INPUTS:
        raise ConfigError(f"unknown conductance detector inputs {inputs!r}; valid: {list(COND_INPUTS)}")
    return inputs


def conductance_inputs(
    conductance: np.ndarray,
    prediction: np.ndarray,
    inputs: str = "conductance",
    num_classes: int | None = None,
) -> np.ndarray:
    """``N x F`` float64 inputs of the conductance detector: ``N x C`` conductance, with
    ``"conductance+class"`` followed by the ``N x num_classes`` one-hot of the predicted class."""
    x = np.asarray(conductance, dtype=np.float64)
    if check_cond_inputs(inputs) == "conductance":
        return x
    if num_classes is None or num_classes < 1:
        raise ConfigError("conductance+class inputs need the number of classes")
    prediction = np.asarray(prediction, dtype=np.int64).reshape(-1)
    if len(prediction) != len(x):
        raise ConfigError(f"{len(x)} conductance rows but {len(prediction)} predictions")
    if len(prediction) and (prediction.min() < 0 or prediction.max() >= num_classes):
        raise ConfigError(f"predicted classes must lie in 0..{num_classes - 1}")
    return np.hstack([x, np.eye(num_classes, dtype=np.float64)[prediction]])


def check_signals(signals: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    unknown = [s for s in signals if s not in SIGNALS]
    if unknown or not signals:
        raise ConfigError(f"unknown signals {unknown}; valid: {list(SIGNALS)}")
    return tuple(signals)


def needs_conductance(signals: tuple[str, ...]) -> bool:
    return "cond" in signals


def needs_lcr(signals: tuple[str, ...]) -> bool:
    return "lcr" in signals


def signal_matrix(
    signals: tuple[str, ...],
    logits: np.ndarray,
    cond_score: np.ndarray | None = None,
    lcr: np.ndarray | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """``N x len(signals)`` inputs of a unified classifier, columns in ``signals`` order; the
    open-world signals come precomputed in ``extra`` (signal name -> ``N`` scores)."""
    columns = []
    for name in signals:
        if name == "cond":
            if cond_score is None:
                raise ConfigError("signal 'cond' needs the conductance detector score")
            columns.append(np.asarray(cond_score, dtype=np.float64))
        elif name == "lcr":
            if lcr is None:
                raise ConfigError("signal 'lcr' needs the label change rate")
            columns.append(np.asarray(lcr, dtype=np.float64))
        elif name in SOFTMAX_SIGNALS:
            columns.append(np.asarray(SOFTMAX_SIGNALS[name](np.asarray(logits)), dtype=np.float64))
        else:
            if extra is None or name not in extra:
                raise ConfigError(f"signal {name!r} needs its precomputed column (the open-world scorers)")
            columns.append(np.asarray(extra[name], dtype=np.float64))
    return np.column_stack(columns)

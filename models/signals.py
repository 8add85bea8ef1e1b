"""The pieces of evidence a verdict can rest on, and the named sets of them a bundle offers.

Each signal is one number per image, "higher or lower may mean wrong" (the unified classifier learns
which). What a signal costs decides what the gate must compute: ``cond`` needs the conductance
vector and its detector, ``lcr`` the mutant ensemble, the softmax signals only the logits.
"""

from __future__ import annotations

import numpy as np

from models.errors import ConfigError
from models.scores import doctor, entropy, margin, msp_score

SIGNALS = ("cond", "lcr", "msp", "entropy", "margin", "doctor")
SOFTMAX_SIGNALS = {"msp": msp_score, "entropy": entropy, "margin": margin, "doctor": doctor}

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
    conductance: np.ndarray, prediction: np.ndarray, inputs: str = "conductance", num_classes: int | None = None
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
) -> np.ndarray:
    """``N x len(signals)`` inputs of a unified classifier, columns in ``signals`` order."""
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
        else:
            columns.append(np.asarray(SOFTMAX_SIGNALS[name](np.asarray(logits)), dtype=np.float64))
    return np.column_stack(columns)

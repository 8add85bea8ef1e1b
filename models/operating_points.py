"""Choosing the gate's threshold on val, by code, from a spec string.

The verdict rule, used everywhere in predgate:

    score >  threshold  ->  reject ("unknown": the input goes to the fallback)
    score <= threshold  ->  accept

so on val, for a threshold t (label 1 = prediction wrong):

    correct_recall(t) = #{correct : s <= t} / #correct   share of correct predictions accepted (TNR)
    wrong_recall(t)   = #{wrong   : s >  t} / #wrong     share of wrong predictions rejected  (TPR)
    coverage(t)       = #{s <= t} / N
    risk(t)           = #{wrong : s <= t} / #{s <= t}     error rate among accepted predictions

Every threshold acts on val like one of the candidates: each distinct val score (accept it and
everything below) or, to reject everything, the largest float below the smallest val score.
Searching these candidates is exhaustive, so each spec's optimum below is exact on val.

Specs:

- ``equal-recall``: the candidate minimising ``|correct_recall - wrong_recall|`` (the val ROC point
  where the two recalls are closest); ties go to the highest threshold, i.e. the most coverage.
- ``correct-recall=R``: the smallest threshold with ``correct_recall >= R``. Correct recall never
  falls as t grows, so this is the strictest gate that still accepts at least a share R of correct
  predictions, and it rejects the most wrong ones among those that do.
- ``wrong-recall=R``: the largest threshold with ``wrong_recall >= R``: the most permissive gate
  that still rejects at least a share R of wrong predictions.
- ``risk=r@c``: among candidates accepting at least one val input, those whose one-sided
  Clopper-Pearson upper bound on the risk at confidence c is ``<= r``; the one with the most
  coverage (the largest threshold). The bound holds per threshold; picking the best of many
  thresholds on the same val data makes it optimistic, so keep c high and check on test.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import beta

from models.errors import ConfigError

VALID_SPECS = ("equal-recall", "correct-recall=R", "wrong-recall=R", "risk=r@c")
"""Forms accepted by :func:`parse_spec` (R, r, c are numbers in (0, 1); R may be 1)."""

_TIE_TOLERANCE = 1e-12

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


@dataclass(frozen=True)
class Spec:
    """A parsed operating-point spec: ``kind`` is one of equal-recall, correct-recall,
    wrong-recall, risk; ``target`` is R or r; ``confidence`` is c (risk only)."""

    kind: str
    target: float | None = None
    confidence: float | None = None


def _spec_error(spec: str, why: str) -> ConfigError:
    return ConfigError(f"invalid operating point {spec!r}: {why}; valid forms: {', '.join(VALID_SPECS)}")


def parse_spec(spec: str) -> Spec:
    """Read ``equal-recall``, ``correct-recall=0.98``, ``wrong-recall=0.995`` or ``risk=0.02@0.95``.

    Raises
    ------
    ConfigError
        On any other form, or a number outside its range (recalls in (0, 1], risk and confidence
        in (0, 1)); the message lists the valid forms.
    """
    if not isinstance(spec, str):
        raise _spec_error(str(spec), "not a string")
    text = spec.strip()
    if text == "equal-recall":
        return Spec("equal-recall")
    match = re.fullmatch(rf"(correct-recall|wrong-recall)={_NUMBER}", text)
    if match:
        target = float(match.group(2))
        if not 0.0 < target <= 1.0:
            raise _spec_error(spec, f"recall {target} is not in (0, 1]")
        return Spec(match.group(1), target)
    match = re.fullmatch(rf"risk={_NUMBER}@{_NUMBER}", text)
    if match:
        risk, confidence = float(match.group(1)), float(match.group(2))
        if not 0.0 < risk < 1.0:
            raise _spec_error(spec, f"risk {risk} is not in (0, 1)")
        if not 0.0 < confidence < 1.0:
            raise _spec_error(spec, f"confidence {confidence} is not in (0, 1)")
        return Spec("risk", risk, confidence)
    raise _spec_error(spec, "unrecognised form")


def reject(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The verdict rule: ``True`` (reject, "unknown") where ``score > threshold``.

    Parameters
    ----------
    scores : N detector scores, higher = more likely wrong.
    """
    return np.asarray(scores) > threshold


def clopper_pearson_upper(errors: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a binomial rate: ``P(rate <= bound) >= confidence``.

    Parameters
    ----------
    errors, n : arrays of error counts and trial counts (n >= 1), broadcastable.
    """
    errors = np.asarray(errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = beta.ppf(confidence, errors + 1.0, n - errors)
    return np.where(errors >= n, 1.0, bound)


def clopper_pearson_interval(errors: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval on a binomial rate; ``(0, 1)`` when ``n`` is 0.

    Exact rather than normal-approximate because the counts it serves (reviewed rejections) start small.
    """
    if n <= 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if errors <= 0 else float(beta.ppf(tail, errors, n - errors + 1))
    high = 1.0 if errors >= n else float(beta.ppf(1.0 - tail, errors + 1, n - errors))
    return low, high


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and what it did on val. ``reject(scores)`` applies it (``score > threshold``).

    Attributes
    ----------
    name : the spec string it was chosen by.
    threshold : accept where ``score <= threshold``.
    correct_recall, wrong_recall, coverage, risk : val figures at the threshold (risk is nan when
        nothing is accepted).
    risk_upper : Clopper-Pearson upper bound on val risk at the spec's confidence (``risk`` specs).
    n_val, n_wrong_val : val size and its number of wrong predictions.
    """

    name: str
    threshold: float
    correct_recall: float
    wrong_recall: float
    coverage: float
    risk: float
    risk_upper: float | None = None
    n_val: int = 0
    n_wrong_val: int = 0

    def reject(self, scores: np.ndarray) -> np.ndarray:
        """``N`` booleans, ``True`` where the input is rejected (``score > threshold``)."""
        return reject(scores, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; a nan risk (nothing accepted) becomes ``None``."""
        data = asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OperatingPoint:
        fields = dict(data)
        if fields.get("risk") is None:
            fields["risk"] = float("nan")
        try:
            return cls(**fields)
        except TypeError as err:
            raise ConfigError(f"invalid operating point record: {err}") from None


@dataclass(frozen=True)
class _Candidates:
    """Every distinct verdict on val, by ascending threshold, with its counts."""

    thresholds: np.ndarray
    accepted: np.ndarray  # inputs with score <= t
    accepted_wrong: np.ndarray  # wrong predictions with score <= t
    n_correct: int
    n_wrong: int

    @property
    def correct_recall(self) -> np.ndarray:
        return (self.accepted - self.accepted_wrong) / self.n_correct

    @property
    def wrong_recall(self) -> np.ndarray:
        return (self.n_wrong - self.accepted_wrong) / self.n_wrong

    @property
    def coverage(self) -> np.ndarray:
        return self.accepted / (self.n_correct + self.n_wrong)

    @property
    def risk(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.accepted > 0, self.accepted_wrong / np.maximum(self.accepted, 1), np.nan)


def _candidates(scores: np.ndarray, wrong: np.ndarray) -> _Candidates:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    wrong = np.asarray(wrong).ravel()
    if scores.shape != wrong.shape or scores.size == 0:
        raise ValueError(
            f"need equally long, non-empty scores and labels, got {scores.shape} and {wrong.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("val scores must be finite")
    if not np.isin(wrong, [0, 1]).all():
        raise ValueError("wrong labels must be 0/1 or boolean")
    wrong = wrong.astype(bool)
    n_wrong = int(wrong.sum())
    n_correct = int(wrong.size - n_wrong)
    if n_wrong == 0 or n_correct == 0:
        raise ValueError("val must contain both correct and wrong predictions to choose a threshold")
    unique = np.unique(scores)
    below_all = np.nextafter(unique[0], -np.inf)
    thresholds = np.concatenate([[below_all], unique])
    accepted = np.searchsorted(np.sort(scores), thresholds, side="right")
    accepted_wrong = np.searchsorted(np.sort(scores[wrong]), thresholds, side="right")
    return _Candidates(thresholds, accepted, accepted_wrong, n_correct, n_wrong)


def choose_threshold(scores_val: np.ndarray, wrong_val: np.ndarray, spec: str) -> OperatingPoint:
    """Pick the threshold that ``spec`` asks for on val (definitions in the module docstring).

    Parameters
    ----------
    scores_val : N val scores, higher = more likely wrong.
    wrong_val : N booleans (or 0/1), 1 where the CNN's prediction is wrong.
    spec : ``equal-recall``, ``correct-recall=R``, ``wrong-recall=R`` or ``risk=r@c``.

    Raises
    ------
    ConfigError
        For an invalid spec, or a ``risk`` spec that no threshold meets on val.
    """
    parsed = parse_spec(spec)
    cand = _candidates(scores_val, wrong_val)
    correct_recall, wrong_recall = cand.correct_recall, cand.wrong_recall
    risk_upper: np.ndarray | None = None
    if parsed.kind == "equal-recall":
        gap = np.abs(correct_recall - wrong_recall)
        # distinct gaps differ by at least 1 / (n_correct * n_wrong); closer ones are rounding
        index = int(np.flatnonzero(gap <= gap.min() + _TIE_TOLERANCE)[-1])
    elif parsed.kind == "correct-recall":
        index = int(np.flatnonzero(correct_recall >= parsed.target)[0])  # last candidate has recall 1
    elif parsed.kind == "wrong-recall":
        index = int(np.flatnonzero(wrong_recall >= parsed.target)[-1])  # first candidate has recall 1
    else:
        assert parsed.confidence is not None and parsed.target is not None
        risk_upper = np.full(cand.thresholds.shape, np.inf)
        some = cand.accepted > 0
        risk_upper[some] = clopper_pearson_upper(
            cand.accepted_wrong[some], cand.accepted[some], parsed.confidence
        )
        feasible = np.flatnonzero(risk_upper <= parsed.target)
        if feasible.size == 0:
            best = float(risk_upper[some].min())
            raise ConfigError(
                f"operating point {spec!r} is infeasible on val: the smallest "
                f"{parsed.confidence:g}-confidence upper bound on risk over all thresholds is {best:.4f} > "
                f"{parsed.target:g} ({cand.n_wrong} wrong of {cand.n_wrong + cand.n_correct} val "
                "predictions); relax the risk or confidence, or use a larger val split"
            )
        index = int(feasible[-1])
    return OperatingPoint(
        name=spec.strip(),
        threshold=float(cand.thresholds[index]),
        correct_recall=float(correct_recall[index]),
        wrong_recall=float(wrong_recall[index]),
        coverage=float(cand.coverage[index]),
        risk=float(cand.risk[index]),
        risk_upper=None if risk_upper is None else float(risk_upper[index]),
        n_val=cand.n_correct + cand.n_wrong,
        n_wrong_val=cand.n_wrong,
    )

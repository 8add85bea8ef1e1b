"""Figures of merit for an error score (higher = more likely wrong), label 1 = prediction wrong.

Everything here takes ``scores`` (N) and ``wrong`` (N booleans or 0/1) and treats wrong predictions
as the positive class, so AUROC, AUPR and recalls read as "how well does the score find errors".
The verdict rule is :func:`models.operating_points.reject` (reject where ``score > threshold``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from tqdm import tqdm

from models.operating_points import reject


def wrong_labels(features: dict[str, np.ndarray]) -> np.ndarray:
    """1 where the CNN's prediction differs from the true label: the detectors' target."""
    return (features["prediction"] != features["label"]).astype(np.int64)


def _check(scores: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    wrong = np.asarray(wrong).ravel()
    if scores.shape != wrong.shape or scores.size == 0:
        raise ValueError(
            f"need equally long, non-empty scores and labels, got {scores.shape} and {wrong.shape}"
        )
    if not np.isin(wrong, [0, 1]).all():
        raise ValueError("wrong labels must be 0/1 or boolean")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, wrong.astype(bool)


def auroc(scores: np.ndarray, wrong: np.ndarray) -> float:
    """Area under the ROC curve with wrong = positive (sklearn; ties count one half)."""
    scores, wrong = _check(scores, wrong)
    return float(roc_auc_score(wrong, scores))


def aupr_error(scores: np.ndarray, wrong: np.ndarray) -> float:
    """Average precision with wrong = positive ("AUPR-Error"); chance level is the error rate."""
    scores, wrong = _check(scores, wrong)
    return float(average_precision_score(wrong, scores))


def fpr_at_wrong_recall(scores: np.ndarray, wrong: np.ndarray, recall: float = 0.95) -> float:
    """Share of correct predictions rejected by the most permissive threshold that rejects at
    least ``recall`` of the wrong ones.

    Interpolation-free: the minimum FPR over the ROC curve's actual points (every distinct
    threshold, ``drop_intermediate=False``) whose TPR is ``>= recall``. With ties the achieved TPR
    can jump past ``recall``; no point between two thresholds is invented.
    """
    scores, wrong = _check(scores, wrong)
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    fpr, tpr, _ = roc_curve(wrong, scores, drop_intermediate=False)
    return float(fpr[tpr >= recall].min())


def risk_coverage_curve(scores: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk when accepting the k most confident inputs, k = 1..N.

    Inputs are sorted by ascending score (most confident first); ``risk[k-1]`` = errors among the
    first k / k and ``coverage[k-1] = k / N``. Inputs with equal scores cannot be ordered by the
    score, so within a tie group the errors are spread evenly: the curve is the expectation over
    random tie-breaking (the hypergeometric mean), and it does not depend on the input order.

    Returns
    -------
    coverage, risk : two arrays of N floats.
    """
    scores, wrong = _check(scores, wrong)
    n = scores.size
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_wrong = scores[order], wrong[order].astype(np.float64)
    # tie groups: [starts[g], ends[g]) in sorted order
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], n]
    group_errors = np.add.reduceat(sorted_wrong, starts)
    errors_before = np.r_[0.0, np.cumsum(group_errors)[:-1]]
    group = np.repeat(np.arange(starts.size), ends - starts)
    k = np.arange(1, n + 1)
    taken = k - starts[group]  # how many of the group are among the first k
    errors = errors_before[group] + taken * group_errors[group] / (ends - starts)[group]
    return k / n, errors / k


def aurc(scores: np.ndarray, wrong: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean of :func:`risk_coverage_curve`'s risks (lower is
    better)."""
    return float(risk_coverage_curve(scores, wrong)[1].mean())


def recalls_at_threshold(scores: np.ndarray, wrong: np.ndarray, threshold: float) -> dict[str, float]:
    """What the verdict rule does at ``threshold``: correct recall (accepted correct / correct),
    wrong recall (rejected wrong / wrong), coverage, and risk among accepted (nan if none)."""
    scores, wrong = _check(scores, wrong)
    rejected = reject(scores, threshold)
    accepted = ~rejected
    n_correct, n_wrong = int((~wrong).sum()), int(wrong.sum())
    return {
        "correct_recall": float((accepted & ~wrong).sum() / n_correct) if n_correct else float("nan"),
        "wrong_recall": float((rejected & wrong).sum() / n_wrong) if n_wrong else float("nan"),
        "coverage": float(accepted.mean()),
        "risk": float((accepted & wrong).sum() / accepted.sum()) if accepted.any() else float("nan"),
    }


def accuracy_with_fallback(wrong: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """Accuracy if a fallback (a person, a bigger model) resolves every rejected input correctly.

    The paper's example: 88.9% -> 98.4%. Only accepted wrong predictions still count as errors.

    Returns
    -------
    dict with ``accuracy`` (the CNN alone), ``accuracy_with_fallback``, ``coverage`` (share
    accepted) and ``accepted_accuracy`` (accuracy among accepted, nan if none).
    """
    wrong = np.asarray(wrong).ravel().astype(bool)
    rejected = np.asarray(rejected).ravel().astype(bool)
    if wrong.shape != rejected.shape or wrong.size == 0:
        raise ValueError(f"need equally long, non-empty arrays, got {wrong.shape} and {rejected.shape}")
    accepted = ~rejected
    return {
        "accuracy": float(1.0 - wrong.mean()),
        "accuracy_with_fallback": float(1.0 - (wrong & accepted).mean()),
        "coverage": float(accepted.mean()),
        "accepted_accuracy": float(1.0 - wrong[accepted].mean()) if accepted.any() else float("nan"),
    }


def accept_lowest(scores: np.ndarray, n: int) -> np.ndarray:
    """Accept the ``n`` inputs with the lowest risk score (stable order on ties): any score at the
    coverage another one reached, so two scores are compared accepting exactly as many inputs."""
    scores = np.asarray(scores).ravel()
    if not 0 <= n <= scores.size:
        raise ValueError(f"cannot accept {n} of {scores.size} inputs")
    accepted = np.zeros(scores.size, dtype=bool)
    accepted[np.argsort(scores, kind="stable")[:n]] = True
    return accepted


# --------------------------------------------------------------------------------------------------
# paired bootstrap
# --------------------------------------------------------------------------------------------------


def bootstrap_indices(n: int, n_boot: int, seed: int, chunk: int = 100) -> Iterator[np.ndarray]:
    """Replicates of ``n`` indices drawn with replacement, ``chunk x n`` at a time, from one seeded
    generator: the same seed gives the same replicates whatever the caller does with them."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_boot - start), n))


def _weighted_auroc(scores: np.ndarray, wrong: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of each resample, given how often each input was drawn (``B x N`` counts).

    A resample is the original inputs with multiplicities, so its AUROC is
    ``sum over tie groups g of pos_g * (neg below g + neg_g / 2) / (P * Q)``, with pos/neg the
    drawn counts of wrong/correct inputs per distinct score: one sort for all replicates instead of
    one per replicate, and equal to ``roc_auc_score`` on the materialised resample.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    drawn = counts[:, order]
    is_wrong = wrong[order]
    # drawn counts of wrong / correct inputs per tie group, one row per replicate
    pos = np.add.reduceat(drawn * is_wrong, starts, axis=1)
    neg = np.add.reduceat(drawn * ~is_wrong, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (total_pos * total_neg)
    return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def paired_bootstrap_auroc(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    wrong: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    progress: bool = False,
) -> dict[str, Any]:
    """AUROC of two scores on the same inputs, their difference, and percentile bootstrap CIs.

    Paired: each replicate resamples the inputs once and scores both a and b on the same draw, so
    the CI of ``a - b`` reflects only how the two scores disagree, not which inputs were drawn.
    Replicates that drew no wrong (or no correct) prediction have no AUROC and are dropped
    (``n_valid`` says how many remain).

    Parameters
    ----------
    scores_a, scores_b : N scores each, higher = more likely wrong.
    wrong : N labels, 1 = prediction wrong.
    n_boot, seed : number of replicates and the generator's seed (same seed, same result).
    confidence : CI level; the CI is the central percentile interval.

    Returns
    -------
    dict with ``auroc_a``, ``auroc_b``, ``diff`` (a - b, on the full data) and ``ci_a``, ``ci_b``,
    ``ci_diff`` (each ``(low, high)``), ``n_boot``, ``n_valid``.
    """
    scores_a, wrong = _check(scores_a, wrong)
    scores_b, _ = _check(scores_b, wrong)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = scores_a.size
    auroc_a, auroc_b = auroc(scores_a, wrong), auroc(scores_b, wrong)
    chunks: Any = bootstrap_indices(n, n_boot, seed)
    if progress:
        chunks = tqdm(chunks, total=-(-n_boot // 100), desc="bootstrap")
    boot_a, boot_b = [], []
    for idx in chunks:
        rows = np.repeat(np.arange(idx.shape[0]), n)
        counts = np.bincount(rows * n + idx.ravel(), minlength=idx.shape[0] * n).reshape(idx.shape[0], n)
        counts = counts.astype(np.float64)
        boot_a.append(_weighted_auroc(scores_a, wrong, counts))
        boot_b.append(_weighted_auroc(scores_b, wrong, counts))
    a, b = np.concatenate(boot_a), np.concatenate(boot_b)
    valid = np.isfinite(a) & np.isfinite(b)
    if not valid.any():
        raise ValueError("no bootstrap replicate held both correct and wrong predictions")
    a, b = a[valid], b[valid]
    tail = 100.0 * (1.0 - confidence) / 2.0

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return float(low), float(high)

    return {
        "auroc_a": auroc_a,
        "auroc_b": auroc_b,
        "diff": auroc_a - auroc_b,
        "ci_a": interval(a),
        "ci_b": interval(b),
        "ci_diff": interval(a - b),
        "n_boot": int(n_boot),
        "n_valid": int(valid.sum()),
    }


def summarise(scores: np.ndarray, wrong: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """The report's per-score figures: AUROC, AUPR-error, FPR at 95% wrong recall, AURC, and the
    recalls at ``threshold`` when one is given."""
    out: dict[str, Any] = {
        "auroc": auroc(scores, wrong),
        "aupr_error": aupr_error(scores, wrong),
        "fpr_at_95_wrong_recall": fpr_at_wrong_recall(scores, wrong, 0.95),
        "aurc": aurc(scores, wrong),
        "n": int(np.asarray(wrong).size),
        "n_wrong": int(np.asarray(wrong).astype(bool).sum()),
    }
    if threshold is not None:
        out.update(recalls_at_threshold(scores, wrong, threshold))
    return out


def paired_selective_accuracy(
    accepted_a: np.ndarray,
    accepted_b: np.ndarray,
    wrong: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Accuracy among accepted inputs of two acceptance masks on the same inputs (typically at equal
    coverage, see :func:`accept_lowest`), their difference a - b, and its paired percentile bootstrap
    CI: each replicate resamples the inputs once for both masks, which stay fixed.

    Returns ``accuracy_a``, ``accuracy_b``, ``diff`` (on the full data, nan where a mask accepts
    nothing), ``ci_diff`` and ``n_boot``.
    """
    wrong = np.asarray(wrong).ravel().astype(bool)
    accepted_a = np.asarray(accepted_a).ravel().astype(bool)
    accepted_b = np.asarray(accepted_b).ravel().astype(bool)
    if not wrong.shape == accepted_a.shape == accepted_b.shape or wrong.size == 0:
        raise ValueError(
            f"need equally long, non-empty arrays, got {wrong.shape}, {accepted_a.shape}, {accepted_b.shape}"
        )
    n = wrong.size

    def selective(accepted: np.ndarray, counts: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (counts @ (accepted & ~wrong)) / (counts @ accepted)

    diffs = []
    for idx in bootstrap_indices(n, n_boot, seed):
        rows = np.repeat(np.arange(idx.shape[0]), n)
        counts = np.bincount(rows * n + idx.ravel(), minlength=idx.shape[0] * n).reshape(idx.shape[0], n)
        diffs.append(selective(accepted_a, counts) - selective(accepted_b, counts))
    both = np.concatenate(diffs)
    both = both[np.isfinite(both)]
    full = selective(accepted_a, np.ones((1, n)))[0], selective(accepted_b, np.ones((1, n)))[0]
    tail = 100.0 * (1.0 - confidence) / 2.0
    ci = [float(v) for v in np.percentile(both, [tail, 100.0 - tail])] if both.size else [np.nan, np.nan]
    return {
        "accuracy_a": float(full[0]),
        "accuracy_b": float(full[1]),
        "diff": float(full[0] - full[1]),
        "ci_diff": ci,
        "n_boot": int(n_boot),
    }

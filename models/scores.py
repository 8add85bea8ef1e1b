"""Softmax baselines that every learned gate must beat, all as "higher = more likely wrong".

Each function takes the CNN's pre-softmax logits (``N x K``, numpy or torch) and returns one score
per row (``N``), of the same kind (numpy in, numpy out; torch in, torch out) and dtype. Everything
works in log space (logsumexp) so that large logits do not overflow, and ``1 - max p`` is computed
from the other classes' mass rather than by subtraction, so that a confident prediction's score
keeps its relative precision instead of rounding to 0: those are the predictions a threshold has
to rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)


def _as_logits(logits: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Check the shape once and hand back a floating tensor plus whether the caller gave numpy."""
    is_numpy = not isinstance(logits, torch.Tensor)
    tensor = torch.from_numpy(np.asarray(logits)) if is_numpy else logits
    if tensor.ndim != 2 or tensor.shape[1] < 2:
        raise ValueError(f"expected N x K logits with K >= 2, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor, is_numpy


def _back(score: torch.Tensor, is_numpy: bool) -> np.ndarray | torch.Tensor:
    return score.detach().cpu().numpy() if is_numpy else score


def _log_p_and_tail(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log p`` (N x K), the argmax index (N x 1) and ``log(1 - p_max)`` (N).

    ``1 - p_max`` is the softmax mass of the other classes, ``exp(lse(others) - lse(all))``;
    taking it from ``log p_max`` instead would round it to 0 once ``p_max`` is within float
    epsilon of 1, and every very confident prediction would tie.
    """
    lse = torch.logsumexp(tensor, dim=1)
    top = tensor.argmax(dim=1, keepdim=True)
    others = tensor.scatter(1, top, float("-inf"))
    return tensor - lse[:, None], top, torch.logsumexp(others, dim=1) - lse


def msp_score(logits: ArrayLike) -> ArrayLike:
    """``1 - max_i p_i`` (Hendrycks & Gimpel's maximum softmax probability, turned into a risk).

    Parameters
    ----------
    logits : N x K array or tensor of pre-softmax logits.

    Returns
    -------
    N scores in [0, 1 - 1/K].
    """
    tensor, is_numpy = _as_logits(logits)
    _, _, log_tail = _log_p_and_tail(tensor)
    return _back(log_tail.exp(), is_numpy)


def entropy(logits: ArrayLike) -> ArrayLike:
    """Shannon entropy of the softmax, in nats: ``-sum_i p_i log p_i`` (0 log 0 taken as 0).

    The top class's ``log p_max`` is taken as ``log1p(-(1 - p_max))`` so that the entropy of a
    confident prediction keeps its relative precision.

    Parameters
    ----------
    logits : N x K array or tensor.

    Returns
    -------
    N scores in [0, log K].
    """
    tensor, is_numpy = _as_logits(logits)
    log_p, top, log_tail = _log_p_and_tail(tensor)
    log_p = log_p.scatter(1, top, torch.log1p(-log_tail.exp())[:, None])
    p = log_p.exp()
    # p underflows to 0 before log p reaches -inf; where it has, the term's limit is 0, not nan.
    terms = torch.where(p > 0, p * log_p, torch.zeros_like(p))
    return _back(-terms.sum(dim=1), is_numpy)


def margin(logits: ArrayLike) -> ArrayLike:
    """``-(top1 - top2)`` of the raw logits: a small gap between the two best classes is risky.

    Uses logits, not probabilities, because softmax saturates and flattens the gap of confident rows.

    Parameters
    ----------
    logits : N x K array or tensor.

    Returns
    -------
    N scores <= 0.
    """
    tensor, is_numpy = _as_logits(logits)
    top2 = torch.topk(tensor, k=2, dim=1).values
    return _back(top2[:, 1] - top2[:, 0], is_numpy)


def doctor(logits: ArrayLike) -> ArrayLike:
    """DOCTOR's ``1 - sum_i p_i^2`` (Granese et al. 2021), the Gini impurity of the softmax.

    Computed as ``sum_i p_i (1 - p_i)``: only the top class can have ``1 - p_i`` near 0, and its
    ``1 - p_max`` comes from the other classes' mass, so no term cancels.

    Parameters
    ----------
    logits : N x K array or tensor.

    Returns
    -------
    N scores in [0, 1 - 1/K].
    """
    tensor, is_numpy = _as_logits(logits)
    log_p, top, log_tail = _log_p_and_tail(tensor)
    p = log_p.exp()
    complement = (-torch.expm1(log_p)).scatter(1, top, log_tail.exp()[:, None])
    return _back((p * complement).sum(dim=1), is_numpy)


def max_logit(logits: ArrayLike) -> ArrayLike:
    """``-max_i z_i`` (Hendrycks et al. 2022, MaxLogit): unlike the softmax, the raw logit keeps how
    strongly the input activates its class, which drops for inputs far from every class.

    Parameters
    ----------
    logits : N x K array or tensor.

    Returns
    -------
    N scores (unbounded).
    """
    tensor, is_numpy = _as_logits(logits)
    return _back(-tensor.max(dim=1).values, is_numpy)


def energy(logits: ArrayLike, temperature: float = 1.0) -> ArrayLike:
    """The free energy ``-T logsumexp(z / T)`` (Liu et al. 2020): higher for inputs the CNN gives
    little total evidence to, whatever class wins.

    Parameters
    ----------
    logits : N x K array or tensor.
    temperature : T > 0.

    Returns
    -------
    N scores (unbounded).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tensor, is_numpy = _as_logits(logits)
    return _back(-temperature * torch.logsumexp(tensor / temperature, dim=1), is_numpy)


LOGIT_SCORES: dict[str, Callable[[ArrayLike], ArrayLike]] = {"maxlogit": max_logit, "energy": energy}
"""Scores of the raw logits that need no fitting, higher = more likely wrong or unknown."""

BASELINE_SCORES: dict[str, Callable[[ArrayLike], ArrayLike]] = {
    "msp": msp_score,
    "entropy": entropy,
    "margin": margin,
    "doctor": doctor,
}
"""Baseline name -> function of ``N x K`` logits giving ``N`` scores, higher = more likely wrong."""

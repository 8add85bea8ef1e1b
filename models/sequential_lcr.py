"""Early-stopping label change rate: evaluate mutants chunk by chunk, stop once the answer is settled.

Wang et al. (2019, "Adversarial sample detection for deep neural network through model mutation
testing") decide with a sequential probability ratio test over mutants and need far fewer than all
of them on average. Here the same idea gives a cheaper LCR: mutants are evaluated in a fixed order,
``chunk_size`` at a time, and after each chunk every image whose stopping rule is satisfied stops;
its LCR is the share of changed labels among the mutants evaluated so far. Images stop
independently: a batch keeps going only for the images still undecided.

Two rules:

* :class:`SPRT` tests ``H0: p = p0`` against ``H1: p = p1`` (``p`` the image's label change
  probability) with error bounds ``alpha`` and ``beta`` (Wald's thresholds).
* :class:`Curtailed` stops once the full-ensemble decision ``LCR >= threshold`` can no longer
  change, whatever the remaining mutants say: the thresholded decision is exactly the full one.

:func:`simulate_sequential` replays a rule on stored per-mutant labels (a bundle's features keep
``mutant_labels``), so the cost/AUROC trade-off is measured without running the CNN;
:func:`sequential_lcr` runs it live and gives the same numbers (a test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from models.errors import ConfigError, InputError
from models.mutation import MutantSpec


class MutantPredictor(Protocol):
    """Anything that labels images with a fixed list of mutants (e.g. :class:`models.lcr.MutantEnsemble`)."""

    def __len__(self) -> int: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``N x C x H x W`` -> ``len(self) x N`` labels."""
        ...


# ------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class SPRT:
    """Wald's sequential probability ratio test of ``p = p0`` against ``p = p1`` (``0 < p0 < p1 < 1``).

    After ``n`` mutants with ``d`` changed labels the log likelihood ratio is
    ``d log(p1/p0) + (n - d) log((1-p1)/(1-p0))``; the test stops for H1 at or above
    ``log((1-beta)/alpha)`` and for H0 at or below ``log(beta/(1-alpha))``. ``alpha = 0`` or
    ``beta = 0`` removes that bound (never stops on that side), which makes ``alpha = beta = 0``
    the full LCR.
    """

    p0: float
    p1: float
    alpha: float = 0.05
    beta: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.p0 < self.p1 < 1.0:
            raise ConfigError(f"SPRT needs 0 < p0 < p1 < 1, got p0={self.p0}, p1={self.p1}")
        if not (0.0 <= self.alpha < 1.0 and 0.0 <= self.beta < 1.0 and self.alpha + self.beta < 1.0):
            raise ConfigError(
                f"SPRT needs 0 <= alpha, beta and alpha + beta < 1, got {self.alpha}, {self.beta}"
            )

    @property
    def bounds(self) -> tuple[float, float]:
        """(lower, upper) bounds on the log likelihood ratio; infinite where an error bound is 0."""
        upper = math.log((1 - self.beta) / self.alpha) if self.alpha > 0 else math.inf
        lower = math.log(self.beta / (1 - self.alpha)) if self.beta > 0 else -math.inf
        return lower, upper

    def settled(self, changed: np.ndarray, used: int, total: int) -> np.ndarray:
        """Which images may stop, given ``changed`` (N) labels changed among the first ``used`` mutants."""
        changed = np.asarray(changed, dtype=np.float64)
        llr = changed * math.log(self.p1 / self.p0) + (used - changed) * math.log(
            (1 - self.p1) / (1 - self.p0)
        )
        lower, upper = self.bounds
        return (llr >= upper) | (llr <= lower)


@dataclass(frozen=True)
class Curtailed:
    """Stop when ``LCR over all mutants >= threshold`` is decided by the mutants seen so far.

    Lossless for that one decision; the LCR value reported for a stopped image is still the share
    among the mutants it used, so scores between thresholds lose resolution.
    """

    threshold: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"Curtailed threshold must lie in [0, 1], got {self.threshold}")

    def settled(self, changed: np.ndarray, used: int, total: int) -> np.ndarray:
        changed = np.asarray(changed, dtype=np.float64)
        needed = self.threshold * total  # full LCR >= threshold  <=>  changes >= needed
        return (changed >= needed) | (changed + (total - used) < needed)


StoppingRule = SPRT | Curtailed
RULES: dict[str, type] = {"sprt": SPRT, "curtailed": Curtailed}


def rule_to_dict(rule: StoppingRule) -> dict[str, Any]:
    """JSON form for a manifest: ``{"rule": "sprt", "p0": ..., ...}``."""
    name = next(k for k, cls in RULES.items() if isinstance(rule, cls))
    return {"rule": name, **asdict(rule)}


def rule_from_dict(data: dict[str, Any]) -> StoppingRule:
    data = dict(data)
    name = data.pop("rule", None)
    if name not in RULES:
        raise ConfigError(f"unknown stopping rule {name!r}; valid: {sorted(RULES)}")
    try:
        return RULES[name](**data)
    except TypeError as exc:
        raise ConfigError(f"invalid {name} rule {data!r}: {exc}") from exc


# ------------------------------------------------------------------------------------ shared
def _checkpoints(total: int, chunk_sizes: Sequence[int]) -> list[int]:
    """Mutants used after each chunk: the running sums of ``chunk_sizes``."""
    return np.cumsum(chunk_sizes).astype(int).tolist() if total else []


def _may_stop(rule: StoppingRule, changed: np.ndarray, used: int, total: int, min_mutants: int) -> np.ndarray:
    if used >= total:
        return np.ones(len(changed), dtype=bool)
    if used < min_mutants:
        return np.zeros(len(changed), dtype=bool)
    return rule.settled(changed, used, total)


def _check_args(chunk_size: int, min_mutants: int) -> None:
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if min_mutants < 0:
        raise ConfigError(f"min_mutants must be >= 0, got {min_mutants}")


# ------------------------------------------------------------------------------------ offline
def simulate_sequential(
    mutant_labels: np.ndarray | torch.Tensor,
    prediction: np.ndarray | torch.Tensor,
    rule: StoppingRule,
    chunk_size: int = 10,
    min_mutants: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Replay the sequential test on stored labels, mutants taken in row order.

    Parameters
    ----------
    mutant_labels : ``M x N`` labels, one row per mutant (a bundle's ``mutant_labels``).
    prediction : ``(N,)`` the original model's predictions.
    rule : when an image may stop (checked after every chunk).
    chunk_size : mutants per chunk; the last chunk may be shorter.
    min_mutants : no image stops before this many mutants.

    Returns
    -------
    lcr : ``(N,)`` float64, changed share among the mutants each image used.
    mutants_used : ``(N,)`` int64, between ``min(chunk_size, M)`` and ``M``.
    """
    _check_args(chunk_size, min_mutants)
    labels = np.asarray(mutant_labels)
    pred = np.asarray(prediction)
    if labels.ndim != 2 or len(labels) == 0 or pred.shape != labels.shape[1:]:
        raise InputError(
            f"expected M x N labels (M >= 1) and N predictions, got {labels.shape} and {pred.shape}"
        )
    total, n = labels.shape
    changed_cum = np.cumsum(labels != pred[None, :], axis=0)
    used = np.zeros(n, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    sizes = [min(chunk_size, total - s) for s in range(0, total, chunk_size)]
    for count in _checkpoints(total, sizes):
        stop = active & _may_stop(rule, changed_cum[count - 1], count, total, min_mutants)
        used[stop] = count
        active &= ~stop
    lcr = changed_cum[used - 1, np.arange(n)] / used
    return lcr.astype(np.float64), used


# --------------------------------------------------------------------------------------- live
def sequential_lcr(
    chunks: Sequence[MutantPredictor],
    x: torch.Tensor | tuple[torch.Tensor, ...],
    original_pred: torch.Tensor,
    rule: StoppingRule,
    min_mutants: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the sequential test with real mutants, chunk after chunk, on the undecided images only.

    Parameters
    ----------
    chunks : mutant predictors in evaluation order (see :func:`chunk_ensembles`); chunk ``i``
        labels every image still undecided after chunks ``0 .. i-1``.
    x : ``N x C x H x W`` normalised images, or a tuple of batch-first tensors that the chunks
        take instead (e.g. the values of a shared prefix); each chunk gets the undecided rows.
    original_pred : ``(N,)`` predictions of the unmutated model.
    rule, min_mutants : as in :func:`simulate_sequential`.

    Returns
    -------
    lcr : ``(N,)`` float32; mutants_used : ``(N,)`` int64. Equal to :func:`simulate_sequential`
    on the concatenated labels of all chunks, with the same chunk sizes.
    """
    _check_args(1, min_mutants)
    parts = x if isinstance(x, tuple) else (x,)
    n = len(original_pred)
    if original_pred.ndim != 1 or not all(
        isinstance(p, torch.Tensor) and p.ndim > 0 and len(p) == n for p in parts
    ):
        raise InputError(
            f"expected batch-first inputs of N = {n} images and N predictions, got "
            f"{[tuple(getattr(p, 'shape', ())) for p in parts]} and {tuple(original_pred.shape)}"
        )
    if not chunks:
        raise ConfigError("sequential LCR needs at least one chunk of mutants")
    total = sum(len(c) for c in chunks)
    pred = original_pred.cpu().long()
    changed = np.zeros(n, dtype=np.int64)
    used = np.zeros(n, dtype=np.int64)
    active = np.arange(n)
    count = 0
    for chunk in chunks:
        if len(active) == 0:
            break
        index = torch.from_numpy(active)
        subset = tuple(p[index.to(p.device)] for p in parts)
        labels = chunk.predict(subset if isinstance(x, tuple) else subset[0]).cpu()
        if labels.shape != (len(chunk), len(active)):
            raise InputError(
                f"a chunk of {len(chunk)} mutants returned labels of shape {tuple(labels.shape)}"
            )
        count += len(chunk)
        changed[active] += (labels != pred[active].view(1, -1)).sum(0).numpy()
        used[active] = count
        stop = _may_stop(rule, changed[active], count, total, min_mutants)
        active = active[~stop]
    lcr = torch.from_numpy(changed / np.maximum(used, 1)).float()
    return lcr, torch.from_numpy(used)


def chunk_ensembles(
    model: nn.Module,
    specs: Sequence[MutantSpec],
    chunk_size: int = 10,
    *,
    factory: Callable[[nn.Module, Sequence[MutantSpec]], MutantPredictor],
) -> list[MutantPredictor]:
    """One predictor per ``chunk_size`` consecutive specs (the last may be shorter).

    ``factory(model, specs)`` builds each (the backend's own ensemble class: torch's
    :class:`models.lcr.MutantEnsemble`, or ONNX Runtime's). Each keeps its own model copy, which for
    a CNN the size of ResNet20 (about 1 MB) is cheap.
    """
    _check_args(chunk_size, 0)
    return [factory(model, specs[i : i + chunk_size]) for i in range(0, len(specs), chunk_size)]


class SequentialLCR:
    """Mutants split into chunks plus a stopping rule: what a gate holds instead of one ensemble.

    Parameters
    ----------
    model : eval-mode CNN; specs : the mutants, in evaluation order.
    rule : :class:`SPRT` or :class:`Curtailed`.
    chunk_size : mutants evaluated between two checks of the rule.
    min_mutants : no image stops earlier.
    factory : how each chunk is evaluated (:class:`models.lcr.MutantEnsemble`, or ONNX Runtime's
        chunk factory); backends build this through their ``early_stopped`` method.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: Sequence[MutantSpec],
        rule: StoppingRule,
        chunk_size: int = 10,
        min_mutants: int = 0,
        *,
        factory: Callable[[nn.Module, Sequence[MutantSpec]], MutantPredictor],
    ) -> None:
        _check_args(chunk_size, min_mutants)
        if not specs:
            raise ConfigError("a sequential LCR needs at least one mutant")
        self.rule = rule
        self.chunk_size = chunk_size
        self.min_mutants = min_mutants
        self.chunks = chunk_ensembles(model, specs, chunk_size, factory=factory)

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks)

    def __call__(self, x: torch.Tensor, original_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lcr (N,), mutants_used (N,))``, see :func:`sequential_lcr`."""
        return sequential_lcr(self.chunks, x, original_pred, self.rule, self.min_mutants)


# ------------------------------------------------------------------------- bundle setting
@dataclass(frozen=True)
class EarlyStopping:
    """How a gate stops its LCR early: the rule, the chunk size and the minimum mutants.

    Kept in the manifest (``lcr.early_stopping``) so the offline replay that the detectors learn
    from (:func:`simulate_sequential`) and the live evaluation the server runs use the same
    chunks and the same rule, and therefore give the same LCR.
    """

    rule: StoppingRule
    chunk_size: int = 10
    min_mutants: int = 0

    def __post_init__(self) -> None:
        _check_args(self.chunk_size, self.min_mutants)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": rule_to_dict(self.rule),
            "chunk_size": self.chunk_size,
            "min_mutants": self.min_mutants,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EarlyStopping:
        try:
            return cls(rule_from_dict(data["rule"]), int(data["chunk_size"]), int(data.get("min_mutants", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid early-stopping setting {data!r}: {exc}") from exc

    def replay(
        self, mutant_labels: np.ndarray | torch.Tensor, prediction: np.ndarray | torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`simulate_sequential` with this setting."""
        return simulate_sequential(mutant_labels, prediction, self.rule, self.chunk_size, self.min_mutants)


def sprt_from_data(
    lcr: np.ndarray, wrong: np.ndarray, alpha: float = 0.01, beta: float | None = None, floor: float = 1e-3
) -> SPRT:
    """An SPRT whose hypotheses are the mean full LCR of correctly (p0) and wrongly (p1) predicted images.

    Estimated on the split the detectors learn from, never on val or test. ``floor`` keeps both
    probabilities inside (0, 1): an LCR of exactly 0 would make a single changed label decisive.
    """
    lcr = np.asarray(lcr, dtype=np.float64)
    wrong = np.asarray(wrong).astype(bool)
    if lcr.shape != wrong.shape or wrong.all() or not wrong.any():
        raise ConfigError("estimating an SPRT needs LCRs of both correctly and wrongly predicted images")
    p0 = float(np.clip(lcr[~wrong].mean(), floor, 1 - floor))
    p1 = float(np.clip(lcr[wrong].mean(), floor, 1 - floor))
    if not p0 < p1:
        raise ConfigError(
            f"mean LCR of wrong predictions ({p1:.4f}) is not above that of correct ones ({p0:.4f}): "
            "LCR does not separate them, early stopping would be meaningless"
        )
    return SPRT(p0=p0, p1=p1, alpha=alpha, beta=alpha if beta is None else beta)

"""Scores of the logits with a few parameters learnt from held-out right and wrong predictions.

Both need only the logits the forward pass already gives (zero extra passes), and both fall back to
a plain softmax score where their learnt form would not help:

- :class:`PNormSoftmax` (Cattelan & Silva 2023, "How to fix a broken confidence estimator"): the MSP
  of the centred logits divided by ``tau * ||z - mean(z)||_p``; ``p`` and ``tau`` are chosen on
  held-out data and ``p = None`` (plain MSP) stays a candidate, as the paper prescribes.
- :class:`RelativeUncertainty` (Dadalto et al. ICLR 2024): ``s(x) = p^T D p`` with a symmetric,
  non-negative, zero-diagonal ``K x K`` matrix ``D`` in closed form from the mean outer products of
  the softmax of wrong and right predictions; with ``D = 1 - I`` it is DOCTOR's Gini impurity.

Label 1 means "the CNN's prediction is wrong"; every score is "higher = more likely wrong".
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from models.errors import BundleError, ConfigError, NotFittedError

P_GRID: tuple[float | None, ...] = (None, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, float("inf"))
TAU_GRID: tuple[float, ...] = tuple(float(t) for t in np.logspace(-2, 2, 17))
LAMBDA_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TEMPERATURE_GRID: tuple[float, ...] = (0.5, 1.0, 2.0)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ConfigError(f"expected N x K logits with K >= 2, got shape {z.shape}")
    return z


def _check_wrong(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise ConfigError(f"{n} logit rows but {len(y)} labels")
    if set(np.unique(y)) != {0, 1}:
        raise ConfigError("need both right (0) and wrong (1) predictions to fit the score")
    return y.astype(np.int64)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _one_minus_max_softmax(z: np.ndarray) -> np.ndarray:
    """``1 - max p`` from the other classes' mass, so confident rows keep their precision."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    top = z.argmax(axis=1)
    others = e.sum(axis=1) - e[np.arange(len(z)), top]
    return others / e.sum(axis=1)


def pnorm_softmax_score(logits: np.ndarray, p: float | None, tau: float) -> np.ndarray:
    """``1 - max softmax(z~ / (tau ||z~||_p))`` with ``z~ = z - mean(z)``; ``p=None`` is the MSP."""
    z = _check_logits(logits)
    if p is None:
        return _one_minus_max_softmax(z)
    centred = z - z.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, ord=p, axis=1, keepdims=True)
    norm = np.where(norm > 0, norm, 1.0)  # all-equal logits: centred is 0 and so is the score's input
    return _one_minus_max_softmax(centred / (tau * norm))


class _FittedScore(BaseEstimator):
    """Shared parts: the fitted check and the JSON + arrays state the bundle stores."""

    type_name = ""

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit first")


class PNormSoftmax(_FittedScore):
    """p-NormSoftmax with ``p`` and ``tau`` chosen by AUROC on the data given to :meth:`fit`.

    Parameters
    ----------
    p_grid, tau_grid : candidates; ``None`` in ``p_grid`` is the plain MSP (kept when nothing beats it).
    """

    type_name = "pnorm_softmax"

    def __init__(
        self, p_grid: tuple[float | None, ...] = P_GRID, tau_grid: tuple[float, ...] = TAU_GRID
    ) -> None:
        self.p_grid = p_grid
        self.tau_grid = tau_grid

    def fit(self, logits: np.ndarray, wrong: np.ndarray) -> PNormSoftmax:
        z = _check_logits(logits)
        y = _check_wrong(wrong, len(z))
        best: tuple[float, float | None, float] = (
            roc_auc_score(y, pnorm_softmax_score(z, None, 1.0)),
            None,
            1.0,
        )
        for p in self.p_grid:
            if p is None:
                continue
            for tau in self.tau_grid:
                auc = roc_auc_score(y, pnorm_softmax_score(z, p, tau))
                if auc > best[0] + 1e-12:
                    best = (auc, p, tau)
        self.fit_auroc_, self.p_, self.tau_ = best
        self.fitted_ = True
        return self

    def decision_function(self, logits: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return pnorm_softmax_score(logits, self.p_, self.tau_)

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._check_fitted()
        p = None if self.p_ is None else ("inf" if np.isinf(self.p_) else float(self.p_))
        return {
            "type": self.type_name,
            "p": p,
            "tau": float(self.tau_),
            "fit_auroc": float(self.fit_auroc_),
        }, {}

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> PNormSoftmax:
        if config.get("type") != cls.type_name:
            raise BundleError(f"expected a {cls.type_name} state, got {config.get('type')!r}")
        out = cls()
        p = config["p"]
        out.p_ = None if p is None else (float("inf") if p == "inf" else float(p))
        out.tau_, out.fit_auroc_, out.fitted_ = float(config["tau"]), float(config["fit_auroc"]), True
        return out


def relative_uncertainty_matrix(probabilities: np.ndarray, wrong: np.ndarray, lam: float) -> np.ndarray:
    """Closed-form ``D``: ``relu(sym(lam * E_wrong[p p^T] - (1 - lam) * E_right[p p^T]))`` off the
    diagonal, unit Frobenius norm; the Gini matrix ``1 - I`` where no entry is positive."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(wrong).astype(bool)
    outer_wrong = np.einsum("ij,ik->jk", p[y], p[y]) / max(int(y.sum()), 1)
    outer_right = np.einsum("ij,ik->jk", p[~y], p[~y]) / max(int((~y).sum()), 1)
    d = lam * outer_wrong - (1.0 - lam) * outer_right
    lower = np.tril(d, k=-1)
    d = np.maximum(lower + lower.T, 0.0)
    if not np.any(d > 0):
        d = 1.0 - np.eye(len(d))
    return d / np.linalg.norm(d)


class RelativeUncertainty(_FittedScore):
    """Rel-U: ``p^T D p`` of the tempered softmax, ``lambda`` and ``T`` chosen by 2-fold AUROC.

    Parameters
    ----------
    lambdas, temperatures : candidates for the trade-off between wrong and right predictions and
        for the softmax temperature.
    seed : of the fold split.
    """

    type_name = "relative_uncertainty"

    def __init__(
        self,
        lambdas: tuple[float, ...] = LAMBDA_GRID,
        temperatures: tuple[float, ...] = TEMPERATURE_GRID,
        seed: int = 0,
    ) -> None:
        self.lambdas = lambdas
        self.temperatures = temperatures
        self.seed = seed

    @staticmethod
    def _score(logits: np.ndarray, matrix: np.ndarray, temperature: float) -> np.ndarray:
        p = _softmax(np.asarray(logits, dtype=np.float64) / temperature)
        return np.einsum("ij,jk,ik->i", p, matrix, p)

    def fit(self, logits: np.ndarray, wrong: np.ndarray) -> RelativeUncertainty:
        z = _check_logits(logits)
        y = _check_wrong(wrong, len(z))
        folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=self.seed)
        best = (-1.0, self.lambdas[0], self.temperatures[0])
        for t in self.temperatures:
            for lam in self.lambdas:
                aucs = []
                for train, held in folds.split(z, y):
                    d = relative_uncertainty_matrix(_softmax(z[train] / t), y[train], lam)
                    aucs.append(roc_auc_score(y[held], self._score(z[held], d, t)))
                if np.mean(aucs) > best[0] + 1e-12:
                    best = (float(np.mean(aucs)), lam, t)
        self.cv_auroc_, self.lambda_, self.temperature_ = best
        self.matrix_ = relative_uncertainty_matrix(_softmax(z / self.temperature_), y, self.lambda_)
        self.fitted_ = True
        return self

    def decision_function(self, logits: np.ndarray) -> np.ndarray:
        self._check_fitted()
        z = _check_logits(logits)
        if z.shape[1] != len(self.matrix_):
            raise ConfigError(f"fitted on {len(self.matrix_)} classes, got {z.shape[1]}")
        return self._score(z, self.matrix_, self.temperature_)

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._check_fitted()
        config = {
            "type": self.type_name,
            "lambda": self.lambda_,
            "temperature": self.temperature_,
            "cv_auroc": self.cv_auroc_,
        }
        return config, {"matrix": self.matrix_}

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> RelativeUncertainty:
        if config.get("type") != cls.type_name:
            raise BundleError(f"expected a {cls.type_name} state, got {config.get('type')!r}")
        out = cls()
        out.lambda_, out.temperature_ = float(config["lambda"]), float(config["temperature"])
        out.cv_auroc_, out.matrix_, out.fitted_ = (
            float(config["cv_auroc"]),
            np.asarray(arrays["matrix"]),
            True,
        )
        return out

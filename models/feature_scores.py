"""Distances in the CNN's penultimate feature space: how far an input lies from the training data.

Softmax scores see only where an input falls relative to the decision boundaries; an input far from
every class (noise, another data set, a sensor fault) can still land deep inside one class's region
and get a confident softmax. A distance to the training features sees that (Lee et al. 2018; Sun et
al. 2022), and the literature finds such scores win exactly under strong shift (Claros-Olivares &
Brockmeier 2025), which is why the gate offers them beside softmax, conductance and LCR.

- :class:`PenultimateProbe` records the input of the CNN's linear head in the same forward pass
  that gives the logits (a forward hook set once, at construction).
- :class:`ClassMahalanobis`: minimum over classes of the Mahalanobis distance to the class mean,
  with one covariance shared by all classes (Lee et al. 2018, without input perturbation).
- :class:`DeepKNN`: distance to the k-th nearest training feature after L2 normalisation (Sun et al.
  2022), over a fixed bank of training features.

Both are fitted on the CNN's own training images (the data the features were shaped by); every
score is "higher = more likely wrong or unknown".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import nn

from models.errors import BundleError, ConfigError, NotFittedError


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of ``model`` (its classification head), by registration order."""
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ConfigError("the model has no nn.Linear head: penultimate features are not available")
    return heads[-1]


class PenultimateProbe:
    """Runs the model and keeps the ``N x D`` input of its linear head from the same forward pass.

    The hook is registered once here, not per batch; :meth:`close` removes it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.head_name, head = find_head(model)
        self._features: torch.Tensor | None = None
        self._handle = head.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # Only the first forward after a reset: later ones through the same model (mutants that
        # share its modules) must not overwrite the CNN's own features.
        if self._features is None:
            self._features = inputs[0].detach()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits N x K, features N x D)`` of normalised ``x``."""
        self._features = None
        logits = self.model(x)
        if self._features is None:
            raise ConfigError(f"the head {self.head_name!r} did not run in the forward pass")
        return logits, self._features.flatten(1)

    def reset(self) -> None:
        """Forget the last forward pass's features (call before the next batch's forward)."""
        self._features = None

    def pop(self) -> torch.Tensor | None:
        """``N x D`` head input of the latest forward pass through the model since :meth:`reset`
        (whoever ran it), or None; cleared on reading."""
        feats, self._features = self._features, None
        return None if feats is None else feats.flatten(1)

    def close(self) -> None:
        self._handle.remove()


def _check_features(x: np.ndarray, n_features: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ConfigError(f"expected N x D features, got shape {x.shape}")
    if n_features is not None and x.shape[1] != n_features:
        raise ConfigError(f"fitted on {n_features} features, got {x.shape[1]}")
    return x


class _FeatureScore(BaseEstimator):
    type_name = ""

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit first")

    @classmethod
    def _check_type(cls, config: dict[str, Any]) -> None:
        if config.get("type") != cls.type_name:
            raise BundleError(f"expected a {cls.type_name} state, got {config.get('type')!r}")


class ClassMahalanobis(_FeatureScore):
    """``min_c (f - mu_c)^T S^-1 (f - mu_c)`` with class means ``mu_c`` and the shared covariance
    ``S`` of the training features (Lee et al. 2018).

    Parameters
    ----------
    ridge : added to the covariance's diagonal, relative to its mean variance, so that a feature
        that never varies (dead ReLU channel) does not make ``S`` singular.
    """

    type_name = "class_mahalanobis"

    def __init__(self, ridge: float = 1e-6) -> None:
        self.ridge = ridge

    def fit(self, features: np.ndarray, labels: np.ndarray) -> ClassMahalanobis:
        x = _check_features(features)
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(y) != len(x):
            raise ConfigError(f"{len(x)} feature rows but {len(y)} labels")
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        cov = centred.T @ centred / len(x)
        cov += np.eye(len(cov)) * self.ridge * max(float(np.trace(cov)) / len(cov), 1e-12)
        self.classes_, self.means_, self.precision_ = classes, means, np.linalg.inv(cov)
        self.n_features_in_ = x.shape[1]
        self.fitted_ = True
        return self

    def class_distances(self, features: np.ndarray) -> np.ndarray:
        """``N x C`` squared Mahalanobis distances to each class mean."""
        self._check_fitted()
        x = _check_features(features, self.n_features_in_)
        diff = x[:, None, :] - self.means_[None, :, :]
        return np.einsum("ncd,de,nce->nc", diff, self.precision_, diff)

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        return self.class_distances(features).min(axis=1)

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._check_fitted()
        arrays = {"classes": self.classes_, "means": self.means_, "precision": self.precision_}
        return {"type": self.type_name, "ridge": self.ridge}, arrays

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> ClassMahalanobis:
        cls._check_type(config)
        out = cls(ridge=float(config["ridge"]))
        out.classes_, out.means_ = (
            np.asarray(arrays["classes"]),
            np.asarray(arrays["means"], dtype=np.float64),
        )
        out.precision_ = np.asarray(arrays["precision"], dtype=np.float64)
        out.n_features_in_, out.fitted_ = out.means_.shape[1], True
        return out


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


class DeepKNN(_FeatureScore):
    """Distance from the L2-normalised feature to its ``k``-th nearest neighbour in a bank of
    L2-normalised training features (Sun et al. 2022).

    Parameters
    ----------
    k : which neighbour (Sun et al. use 50 with the full CIFAR-10 training set, 1 with 1% of it).
    bank_size : at most this many training rows are kept (a seeded random subset), which bounds the
        cost per input to one ``bank_size x D`` matrix product.
    seed : of the subset.
    """

    type_name = "deep_knn"

    def __init__(self, k: int = 10, bank_size: int = 10000, seed: int = 0) -> None:
        self.k = k
        self.bank_size = bank_size
        self.seed = seed

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> DeepKNN:
        x = _check_features(features)
        if self.k < 1 or self.k > len(x):
            raise ConfigError(f"k must lie in 1..{len(x)} (the training rows), got {self.k}")
        if len(x) > self.bank_size:
            keep = np.random.default_rng(self.seed).choice(len(x), self.bank_size, replace=False)
            x = x[np.sort(keep)]
        self.bank_ = _l2_normalise(x).astype(np.float32)
        self.n_features_in_ = x.shape[1]
        self.fitted_ = True
        return self

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        self._check_fitted()
        q = _l2_normalise(_check_features(features, self.n_features_in_)).astype(np.float32)
        # For unit vectors ||a - b||^2 = 2 - 2 a.b: the k-th largest similarity is the k-th nearest.
        sims = torch.from_numpy(q) @ torch.from_numpy(self.bank_).T
        kth = torch.topk(sims, self.k, dim=1).values[:, -1].double().numpy()
        return np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._check_fitted()
        config = {"type": self.type_name, "k": self.k, "bank_size": self.bank_size, "seed": self.seed}
        return config, {"bank": self.bank_}

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> DeepKNN:
        cls._check_type(config)
        out = cls(k=int(config["k"]), bank_size=int(config["bank_size"]), seed=int(config["seed"]))
        out.bank_ = np.asarray(arrays["bank"], dtype=np.float32)
        out.n_features_in_, out.fitted_ = out.bank_.shape[1], True
        return out

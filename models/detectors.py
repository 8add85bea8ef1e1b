"""Error detectors: estimators that output the probability that the CNN's prediction is wrong.

Two estimators, both following the scikit-learn contract (``__init__`` stores parameters, ``fit``
validates and sets trailing-underscore attributes, methods on an unfitted estimator raise
:class:`models.errors.NotFittedError`), label 1 = "prediction wrong":

- :class:`ConductanceDetector`, the paper's detector (Wu, Michel & Briot, arXiv 1910.00387):
  an MLP 200-200 over standardised per-channel conductance.
- :class:`UnifiedClassifier`, the paper's second stage over a few scalar signals
  (conductance detector score, LCR, optionally softmax baselines): NN 10-10, random forest, LDA or QDA.

Both MLPs come from one implementation (:func:`build_mlp`, :func:`train_mlp`), only the sizes differ.
A fitted random forest is kept as its trees' arrays and scored by :class:`ForestArrays`, a vectorised
re-implementation of sklearn's tree traversal, so that no sklearn forest object is needed at serve
time.

This module fits and scores; it does not save. Storing a fitted detector without pickle (a JSON-able
config and named arrays) and rebuilding it is the job of :mod:`models.detector_state`, which imports
this module, never the other way round.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis, QuadraticDiscriminantAnalysis
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import NotFittedError as _SklearnNotFittedError
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_array, check_is_fitted, validate_data
from torch import nn

from models.errors import ConfigError, NotFittedError

_PREDICT_CHUNK = 8192  # rows per forward pass / tree traversal at predict time, to bound memory


# --------------------------------------------------------------------------------------------------
# shared pieces: labels, standardisation, the MLP
# --------------------------------------------------------------------------------------------------


def _check_labels(y: np.ndarray, what: str) -> np.ndarray:
    """Labels must be 0 (correct) / 1 (wrong) with both present: AUROC and pos_weight need both."""
    y = np.asarray(y)
    if not np.isin(y, [0, 1]).all():
        raise ValueError(f"{what} must hold 0 (prediction correct) and 1 (prediction wrong) only")
    y = y.astype(np.int64)
    if y.min() == y.max():
        raise ValueError(f"{what} must contain both correct (0) and wrong (1) predictions")
    return y


def _fit_standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of the fit data; sklearn's StandardScaler sets constant columns' scale to 1."""
    scaler = StandardScaler().fit(x)
    return scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)


def _standardise(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (np.asarray(x, dtype=np.float64) - mean) / scale


def build_mlp(n_in: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear-ReLU-Dropout blocks, then one output logit (of "prediction wrong").

    Parameters
    ----------
    n_in : number of input features.
    hidden : widths of the hidden layers, e.g. ``(200, 200)``.
    dropout : drop probability after every hidden ReLU (0 disables it).
    """
    layers: list[nn.Module] = []
    width = n_in
    for size in hidden:
        layers += [nn.Linear(width, int(size)), nn.ReLU(), nn.Dropout(dropout)]
        width = int(size)
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


@dataclass
class TrainResult:
    """What early stopping saw: the weights kept are those of ``best_epoch`` (0-based)."""

    best_epoch: int
    best_val_auroc: float
    val_auroc_history: list[float]


def mlp_logits(network: nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
    """Eval-mode logits of ``N x F`` standardised inputs, in fixed chunks (so scores do not depend
    on how the caller batches), returned as float64 ``N``."""
    network.eval()
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], _PREDICT_CHUNK):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + _PREDICT_CHUNK], np.float32))
            out.append(network(batch.to(device)).squeeze(1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)


def train_mlp(
    network: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    lr: float,
    weight_decay: float,
    batch_size: int,
    max_epochs: int,
    patience: int,
    generator: torch.Generator,
    device: torch.device,
    progress: bool = False,
) -> TrainResult:
    """Adam on class-weighted BCE, early-stopped on val AUROC; leaves the best weights in ``network``.

    Errors are rare (a few percent to 20%), so the loss weighs positives by ``n_neg / n_pos`` and
    progress is judged by AUROC, which accuracy would hide behind "always correct".

    Parameters
    ----------
    network : module mapping ``B x F`` float32 to ``B x 1`` logits; trained in place.
    x_train, y_train : ``N x F`` standardised inputs and ``N`` labels in {0, 1}.
    x_val, y_val : the same for the early-stopping set (both classes present).
    generator : CPU generator that orders the mini-batches (weight init and dropout use the global
        RNG, which the caller seeds).
    """
    network.to(device)
    x = torch.from_numpy(np.ascontiguousarray(x_train, np.float32)).to(device)
    y = torch.from_numpy(y_train.astype(np.float32)).to(device)
    n_pos = float(y_train.sum())
    pos_weight = torch.tensor([(len(y_train) - n_pos) / n_pos], dtype=torch.float32, device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimiser = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=weight_decay)

    epochs: Any = range(max_epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="detector epochs")
    best_auroc, best_epoch, best_state, since_best = -np.inf, -1, None, 0
    history: list[float] = []
    for epoch in epochs:
        network.train()
        order = torch.randperm(len(y), generator=generator).to(device)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(network(x[idx]).squeeze(1), y[idx])
            loss.backward()
            optimiser.step()
        auroc = float(roc_auc_score(y_val, mlp_logits(network, x_val, device)))
        history.append(auroc)
        if auroc > best_auroc:
            best_auroc, best_epoch, since_best = auroc, epoch, 0
            best_state = copy.deepcopy(network.state_dict())
        else:
            since_best += 1
            if since_best >= patience:
                break
    assert best_state is not None  # max_epochs >= 1 is checked by the callers
    network.load_state_dict(best_state)
    network.eval()
    return TrainResult(best_epoch=best_epoch, best_val_auroc=best_auroc, val_auroc_history=history)


# --------------------------------------------------------------------------------------------------
# random forest as arrays
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForestArrays:
    """A fitted binary random forest as flat arrays, scored like sklearn's ``predict_proba``.

    Nodes of all trees are concatenated; ``node_offsets[t]`` is tree t's first node and child
    indices are global (-1 marks a leaf). Matching sklearn bit for bit needs its two details:
    inputs are cast to float32 before the ``x <= threshold`` comparison (thresholds stay float64),
    and tree probabilities are summed in tree order, then divided by the number of trees.
    """

    children_left: np.ndarray  # (M,) int64
    children_right: np.ndarray  # (M,) int64
    feature: np.ndarray  # (M,) int64
    threshold: np.ndarray  # (M,) float64
    value: np.ndarray  # (M, n_classes) float64, class fractions of the leaf (weighted)
    node_offsets: np.ndarray  # (T + 1,) int64

    @classmethod
    def from_sklearn(cls, forest: RandomForestClassifier) -> ForestArrays:
        if forest.n_outputs_ != 1:
            raise ValueError("only single-output forests are supported")
        lefts, rights, features, thresholds, values, offsets = [], [], [], [], [], [0]
        for tree in (est.tree_ for est in forest.estimators_):
            base = offsets[-1]
            left = tree.children_left.astype(np.int64)
            right = tree.children_right.astype(np.int64)
            lefts.append(np.where(left >= 0, left + base, -1))
            rights.append(np.where(right >= 0, right + base, -1))
            features.append(tree.feature.astype(np.int64))
            thresholds.append(tree.threshold.astype(np.float64))
            # In sklearn >= 1.4 tree_.value already holds the (weighted) class fractions that
            # DecisionTreeClassifier.predict_proba returns unchanged.
            values.append(np.asarray(tree.value[:, 0, :], dtype=np.float64))
            offsets.append(base + tree.node_count)
        return cls(
            children_left=np.concatenate(lefts),
            children_right=np.concatenate(rights),
            feature=np.concatenate(features),
            threshold=np.concatenate(thresholds),
            value=np.concatenate(values),
            node_offsets=np.asarray(offsets, dtype=np.int64),
        )

    @property
    def n_trees(self) -> int:
        return len(self.node_offsets) - 1

    def leaves(self, x: np.ndarray) -> np.ndarray:
        """Global leaf index reached by each row in each tree: ``T x N`` for ``N x F`` inputs."""
        x32 = np.asarray(x, dtype=np.float32)
        n = x32.shape[0]
        node = np.repeat(self.node_offsets[:-1, None], n, axis=1)
        rows = np.broadcast_to(np.arange(n)[None, :], node.shape)
        while True:
            left = self.children_left[node]
            active = left >= 0
            if not active.any():
                return node
            feat = np.where(active, self.feature[node], 0)
            go_left = x32[rows, feat].astype(np.float64) <= self.threshold[node]
            node = np.where(active, np.where(go_left, left, self.children_right[node]), node)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``N x n_classes`` mean of the trees' leaf class fractions."""
        x = np.asarray(x)
        proba = np.zeros((x.shape[0], self.value.shape[1]), dtype=np.float64)
        for start in range(0, x.shape[0], _PREDICT_CHUNK):
            leaves = self.leaves(x[start : start + _PREDICT_CHUNK])
            block = proba[start : start + _PREDICT_CHUNK]
            for tree_leaves in leaves:  # tree order, as sklearn accumulates
                block += self.value[tree_leaves]
        proba /= self.n_trees
        return proba


# --------------------------------------------------------------------------------------------------
# estimators
# --------------------------------------------------------------------------------------------------


class Detector(ClassifierMixin, BaseEstimator):
    """What both detectors share: label checks, the fitted check, probabilities.

    Public as the type that :mod:`models.detector_state` stores and rebuilds and that
    :mod:`models.adaptive_attack` differentiates.
    """

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "n_features_in_") and hasattr(self, "mean_")

    def __sklearn_tags__(self):  # type: ignore[no-untyped-def]
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def check_fitted(self) -> None:
        """Raise :class:`models.errors.NotFittedError` (an sklearn one too) before ``fit``."""
        try:
            check_is_fitted(self)
        except _SklearnNotFittedError as err:
            raise NotFittedError(str(err)) from None

    def _validate_fit(
        self, x: Any, y: Any, x_val: Any, y_val: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        x, y = validate_data(self, x, y, reset=True, dtype=np.float64)
        y = _check_labels(y, "y")
        if (x_val is None) != (y_val is None):
            raise ValueError("give both X_val and y_val, or neither")
        if x_val is not None:
            x_val = check_array(x_val, dtype=np.float64)
            if x_val.shape[1] != x.shape[1]:
                raise ValueError(f"X_val has {x_val.shape[1]} features, X has {x.shape[1]}")
            y_val = _check_labels(np.ravel(y_val), "y_val")
            if len(y_val) != len(x_val):
                raise ValueError(f"X_val has {len(x_val)} rows but y_val has {len(y_val)}")
        self.classes_ = np.array([0, 1])
        return x, y, x_val, y_val

    def _validate_predict(self, x: Any) -> np.ndarray:
        self.check_fitted()
        return validate_data(self, x, reset=False, dtype=np.float64)

    def _wrong_probability(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, X: Any) -> np.ndarray:
        """``N x 2`` probabilities of [prediction correct, prediction wrong].

        Parameters
        ----------
        X : N x F inputs, the same features as in ``fit``.
        """
        p_wrong = self._wrong_probability(self._validate_predict(X))
        return np.column_stack([1.0 - p_wrong, p_wrong])

    def decision_function(self, X: Any) -> np.ndarray:
        """``N`` probabilities that the prediction is wrong: the score thresholds act on."""
        return self._wrong_probability(self._validate_predict(X))

    def predict(self, X: Any) -> np.ndarray:
        """``N`` labels, 1 where P(wrong) >= 0.5 (the gate itself uses a tuned operating point)."""
        return (self.decision_function(X) >= 0.5).astype(np.int64)


class _MLPMixin:
    """Fit and score an MLP on standardised inputs: the one implementation both detectors use."""

    hidden: Sequence[int]
    dropout: float
    lr: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    patience: int
    val_fraction: float
    seed: int
    device: str
    progress: bool

    def _fit_mlp(
        self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray | None, y_val: np.ndarray | None
    ) -> None:
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ConfigError("max_epochs, patience and batch_size must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if x_val is None:
            # No caller-given val: hold out a stratified share of the fit data for early stopping.
            x, x_val, y, y_val = train_test_split(
                x, y, test_size=self.val_fraction, stratify=y, random_state=self.seed
            )
            _check_labels(y_val, "the early-stopping holdout")
        self.mean_, self.scale_ = _fit_standardiser(x)
        device = torch.device(self.device)
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            network = build_mlp(x.shape[1], tuple(self.hidden), self.dropout)
            result = train_mlp(
                network,
                _standardise(x, self.mean_, self.scale_),
                y,
                _standardise(x_val, self.mean_, self.scale_),
                y_val,
                lr=self.lr,
                weight_decay=self.weight_decay,
                batch_size=self.batch_size,
                max_epochs=self.max_epochs,
                patience=self.patience,
                generator=torch.Generator().manual_seed(self.seed),
                device=device,
                progress=self.progress,
            )
        self.network_ = network
        self.best_epoch_ = result.best_epoch
        self.best_val_auroc_ = result.best_val_auroc
        self.val_auroc_history_ = result.val_auroc_history

    def _mlp_probability(self, x: np.ndarray) -> np.ndarray:
        logits = mlp_logits(
            self.network_, _standardise(x, self.mean_, self.scale_), torch.device(self.device)
        )
        return torch.sigmoid(torch.from_numpy(logits)).numpy()


class ConductanceDetector(_MLPMixin, Detector):
    """The paper's conductance detector: MLP over one layer's per-channel conductance.

    Inputs are standardised with the fit data's mean and std (conductance scales differ by orders
    of magnitude between channels); MLP ``hidden`` with ReLU and dropout; Adam on BCE with
    ``pos_weight = n_neg / n_pos``; early stopping on val AUROC, keeping the best epoch's weights.

    Parameters
    ----------
    hidden : hidden layer widths.
    dropout : dropout after each hidden ReLU.
    lr, weight_decay : Adam settings.
    batch_size, max_epochs, patience : mini-batch size; epoch cap; epochs without a val AUROC gain
        before stopping.
    val_fraction : share of the fit data held out (stratified) for early stopping when ``fit`` gets
        no ``X_val``.
    seed : seeds weight init, dropout, batch order and the holdout split; CPU runs are repeatable.
    device : torch device for training and scoring.
    progress : show a progress bar over epochs.

    Attributes
    ----------
    mean_, scale_ : (F,) standardisation statistics of the training part of the fit data.
    network_ : the trained ``torch.nn.Sequential`` (eval mode).
    best_epoch_, best_val_auroc_, val_auroc_history_ : what early stopping saw.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (200, 200),
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 512,
        max_epochs: int = 30,
        patience: int = 5,
        val_fraction: float = 0.1,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = False,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device
        self.progress = progress

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> ConductanceDetector:
        """Train on ``N x C`` conductance with labels 1 = prediction wrong.

        Parameters
        ----------
        X : N x C per-channel conductance of the fit split.
        y : N labels, 1 where the CNN's prediction is wrong.
        X_val, y_val : optional early-stopping set (e.g. the val split); without it a stratified
            ``val_fraction`` of X is held out.
        """
        x, y, x_val, y_val = self._validate_fit(X, y, X_val, y_val)
        self._fit_mlp(x, y, x_val, y_val)
        return self

    def _wrong_probability(self, x: np.ndarray) -> np.ndarray:
        return self._mlp_probability(x)


UNIFIED_KINDS = ("nn", "rf", "lda", "qda")


class UnifiedClassifier(_MLPMixin, Detector):
    """The paper's unified classifier over a few scalar signals per input.

    Typical columns: [conductance detector score, LCR], optionally max softmax probability, entropy
    and margin. Inputs are standardised for every kind, not only ``nn``: trees do not care, LDA is
    affine invariant, and QDA's ``reg_param`` shrinks towards the identity, which only means the same
    thing for every column once the columns share a unit scale.

    Parameters
    ----------
    kind : ``"nn"`` (MLP ``hidden``, the same code as :class:`ConductanceDetector`), ``"rf"``
        (random forest: ``n_estimators`` trees of ``max_depth``, balanced class weights),
        ``"lda"`` or ``"qda"`` (with ``reg_param``).
    hidden, dropout, lr, weight_decay, batch_size, max_epochs, patience, val_fraction : the MLP's
        settings (``nn`` only); small inputs call for a larger learning rate and more epochs than the
        conductance detector.
    n_estimators, max_depth, n_jobs : random forest settings.
    reg_param : QDA covariance regularisation.
    seed : seeds the MLP and the forest.
    device, progress : as in :class:`ConductanceDetector`.

    Attributes
    ----------
    mean_, scale_ : (F,) standardisation statistics.
    network_ (nn), forest_ (:class:`ForestArrays`, rf), estimator_ (sklearn LDA/QDA).
    """

    def __init__(
        self,
        kind: str = "nn",
        hidden: Sequence[int] = (10, 10),
        dropout: float = 0.0,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        max_epochs: int = 100,
        patience: int = 10,
        val_fraction: float = 0.2,
        n_estimators: int = 100,
        max_depth: int = 10,
        reg_param: float = 1e-3,
        n_jobs: int = 1,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = False,
    ) -> None:
        self.kind = kind
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.reg_param = reg_param
        self.n_jobs = n_jobs
        self.seed = seed
        self.device = device
        self.progress = progress

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> UnifiedClassifier:
        """Train on ``N x F`` signals with labels 1 = prediction wrong.

        Parameters
        ----------
        X : N x F signals (higher or lower may mean wrong; the classifier learns which).
        y : N labels, 1 where the CNN's prediction is wrong.
        X_val, y_val : early-stopping set for ``nn``; ignored by ``rf``/``lda``/``qda``, which have
            no epochs to stop.
        """
        if self.kind not in UNIFIED_KINDS:
            raise ConfigError(f"kind must be one of {UNIFIED_KINDS}, got {self.kind!r}")
        x, y, x_val, y_val = self._validate_fit(X, y, X_val, y_val)
        if self.kind == "nn":
            self._fit_mlp(x, y, x_val, y_val)
            return self
        self.mean_, self.scale_ = _fit_standardiser(x)
        xs = _standardise(x, self.mean_, self.scale_)
        if self.kind == "rf":
            forest = RandomForestClassifier(
                n_estimators=self.n_estimators,
                max_depth=self.max_depth,
                class_weight="balanced",
                random_state=self.seed,
                n_jobs=self.n_jobs,
            ).fit(xs, y)
            self.forest_ = ForestArrays.from_sklearn(forest)
        elif self.kind == "lda":
            self.estimator_ = LinearDiscriminantAnalysis().fit(xs, y)
        else:
            self.estimator_ = QuadraticDiscriminantAnalysis(reg_param=self.reg_param).fit(xs, y)
        return self

    def _wrong_probability(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "nn":
            return self._mlp_probability(x)
        xs = _standardise(x, self.mean_, self.scale_)
        if self.kind == "rf":
            return self.forest_.predict_proba(xs)[:, 1]
        return self.estimator_.predict_proba(xs)[:, 1]

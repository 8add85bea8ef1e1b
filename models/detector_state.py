"""A fitted detector as data: its state as a JSON-able config plus named numpy arrays, and back.

A bundle stores every detector this way (the config in JSON, the arrays in a safetensors file), so
that serving never unpickles anything: :func:`save_state` takes a fitted
:class:`~models.detectors.ConductanceDetector` or :class:`~models.detectors.UnifiedClassifier` apart,
:func:`load_state` rebuilds it so that it scores exactly as before. The pieces:

- the standardisation (``mean``, ``scale``) and the scalars ``fit`` set (``n_features_in_``, what
  early stopping saw), common to every detector;
- an MLP as its ``state_dict`` tensors (``net.*``), rebuilt with :func:`models.detectors.build_mlp`;
- a random forest as the arrays of its :class:`~models.detectors.ForestArrays` (``forest.*``);
- an LDA/QDA as every fitted attribute of the sklearn estimator (``estimator.*``), set back on a new
  one, so that sklearn's own ``predict_proba`` then computes from identical numbers.

Kept apart from :mod:`models.detectors` (fitting and scoring), which it imports: only this module
knows the stored layout and its version, :data:`STATE_FORMAT`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis, QuadraticDiscriminantAnalysis

from models.detectors import ConductanceDetector, Detector, ForestArrays, UnifiedClassifier, build_mlp
from models.errors import BundleError

STATE_FORMAT = 1
"""Version of the stored layout; bump when the arrays or config keys change meaning."""

DETECTOR_TYPES: dict[str, type[Detector]] = {
    "ConductanceDetector": ConductanceDetector,
    "UnifiedClassifier": UnifiedClassifier,
}
"""The only classes :func:`load_state` rebuilds, by the name ``config["type"]`` gives."""

_MLP_FITTED = ("n_features_in_", "best_epoch_", "best_val_auroc_", "val_auroc_history_")
_OTHER_FITTED = ("n_features_in_",)


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _json_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def _kind(detector: Detector) -> str:
    """``"nn"`` for either MLP, else the unified classifier's kind."""
    if isinstance(detector, ConductanceDetector):
        return "nn"
    if isinstance(detector, UnifiedClassifier):
        return detector.kind
    raise TypeError(f"cannot store a {type(detector).__name__}")


# --------------------------------------------------------------------------------------------------
# the whole detector
# --------------------------------------------------------------------------------------------------


def save_state(detector: Detector) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, arrays)`` of a fitted detector: a JSON-able config whose ``"type"`` names its class
    for :func:`load_state`, and named numpy arrays (what a safetensors file holds).

    Raises
    ------
    models.errors.NotFittedError
        The detector was never fitted.
    """
    detector.check_fitted()
    kind = _kind(detector)
    fitted = _MLP_FITTED if kind == "nn" else _OTHER_FITTED
    config: dict[str, Any] = {
        "type": type(detector).__name__,
        "format": STATE_FORMAT,
        "params": _json_params(detector.get_params(deep=False)),
        "fitted": {key: _scalar(getattr(detector, key)) for key in fitted},
    }
    arrays = {"mean": detector.mean_, "scale": detector.scale_}
    if kind == "nn":
        arrays.update(_mlp_arrays(detector.network_))
    elif kind == "rf":
        arrays.update(forest_to_arrays(detector.forest_, "forest"))
    else:
        est_config, est_arrays = discriminant_to_state(detector.estimator_, "estimator")
        config["estimator"] = est_config
        arrays.update(est_arrays)
    return config, arrays


def load_state(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Detector:
    """Rebuild whichever detector ``config["type"]`` names (only the classes in ``DETECTOR_TYPES``)
    from :func:`save_state`'s output; it scores exactly as the original.

    Raises
    ------
    models.errors.BundleError
        Unknown type or format, or a config key or array the type needs is missing.
    """
    cls = DETECTOR_TYPES.get(config.get("type", ""))
    if cls is None:
        raise BundleError(f"unknown detector type {config.get('type')!r}; known: {sorted(DETECTOR_TYPES)}")
    if config.get("format") != STATE_FORMAT:
        raise BundleError(f"detector state format {config.get('format')!r}, expected {STATE_FORMAT}")
    params = dict(config["params"])
    if isinstance(params.get("hidden"), list):
        params["hidden"] = tuple(params["hidden"])
    detector = cls(**params)
    try:
        for key, value in config["fitted"].items():
            setattr(detector, key, list(value) if isinstance(value, list) else value)
        detector.mean_ = np.asarray(arrays["mean"], dtype=np.float64)
        detector.scale_ = np.asarray(arrays["scale"], dtype=np.float64)
    except KeyError as err:
        raise BundleError(f"detector state lacks {err.args[0]!r}") from None
    detector.classes_ = np.array([0, 1])
    kind = _kind(detector)
    if kind == "nn":
        detector.network_ = _load_mlp(detector, arrays)
    elif kind == "rf":
        detector.forest_ = forest_from_arrays(arrays, "forest")
    elif kind in ("lda", "qda"):
        if "estimator" not in config:
            raise BundleError(f"{kind} state lacks its 'estimator' section")
        detector.estimator_ = discriminant_from_state(config["estimator"], arrays, "estimator")
    else:
        raise BundleError(f"unknown unified classifier kind {kind!r}")
    return detector


# --------------------------------------------------------------------------------------------------
# MLP as its state_dict
# --------------------------------------------------------------------------------------------------


def _mlp_arrays(network: torch.nn.Module) -> dict[str, np.ndarray]:
    return {f"net.{k}": v.detach().cpu().numpy() for k, v in network.state_dict().items()}


def _load_mlp(detector: Any, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
    """The detector's MLP, rebuilt from its settings and loaded with the ``net.*`` arrays (eval mode,
    on the detector's device)."""
    network = build_mlp(int(detector.n_features_in_), tuple(detector.hidden), detector.dropout)
    keys = network.state_dict().keys()
    try:
        state = {k: torch.from_numpy(np.array(arrays[f"net.{k}"])) for k in keys}
    except KeyError as err:
        raise BundleError(f"MLP state lacks array {err.args[0]!r}") from None
    network.load_state_dict(state)
    return network.to(torch.device(detector.device)).eval()


# --------------------------------------------------------------------------------------------------
# random forest as arrays
# --------------------------------------------------------------------------------------------------

FOREST_ARRAYS = tuple(field.name for field in fields(ForestArrays))
"""The arrays of a stored forest, each under ``{prefix}.{name}``."""


def forest_to_arrays(forest: ForestArrays, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}.{name}": getattr(forest, name) for name in FOREST_ARRAYS}


def forest_from_arrays(arrays: dict[str, np.ndarray], prefix: str) -> ForestArrays:
    try:
        return ForestArrays(**{name: np.asarray(arrays[f"{prefix}.{name}"]) for name in FOREST_ARRAYS})
    except KeyError as err:
        raise BundleError(f"forest state lacks array {err.args[0]!r}") from None


# --------------------------------------------------------------------------------------------------
# LDA / QDA as attributes
# --------------------------------------------------------------------------------------------------

_DISCRIMINANTS: dict[str, type] = {
    "LinearDiscriminantAnalysis": LinearDiscriminantAnalysis,
    "QuadraticDiscriminantAnalysis": QuadraticDiscriminantAnalysis,
}


def discriminant_to_state(estimator: Any, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every fitted attribute of a fitted LDA/QDA: arrays by name, lists of arrays element by element,
    scalars in the config. Rebuilding sets the same attributes, so sklearn's own ``predict_proba``
    then computes from identical numbers."""
    name = type(estimator).__name__
    if name not in _DISCRIMINANTS:
        raise TypeError(f"cannot store a {name}")
    params = estimator.get_params(deep=False)
    config: dict[str, Any] = {"class": name, "params": params, "scalars": {}, "lists": {}, "arrays": []}
    arrays: dict[str, np.ndarray] = {}
    for key, value in vars(estimator).items():
        if key in params:
            continue
        if isinstance(value, np.ndarray):
            arrays[f"{prefix}.{key}"] = value
            config["arrays"].append(key)
        elif isinstance(value, list) and all(isinstance(v, np.ndarray) for v in value):
            for i, item in enumerate(value):
                arrays[f"{prefix}.{key}.{i}"] = item
            config["lists"][key] = len(value)
        elif value is None or isinstance(value, (bool, int, float, str, np.generic)):
            config["scalars"][key] = _scalar(value)
        else:
            raise TypeError(f"{name}.{key} of type {type(value).__name__} cannot be stored without pickle")
    return config, arrays


def discriminant_from_state(config: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str) -> Any:
    """The LDA/QDA :func:`discriminant_to_state` took apart, with every fitted attribute set back."""
    cls = _DISCRIMINANTS.get(config.get("class", ""))
    if cls is None:
        raise BundleError(f"unknown discriminant class {config.get('class')!r}")
    estimator = cls(**config["params"])
    try:
        for key, value in config["scalars"].items():
            setattr(estimator, key, value)
        for key in config["arrays"]:
            setattr(estimator, key, np.asarray(arrays[f"{prefix}.{key}"]))
        for key, length in config["lists"].items():
            setattr(estimator, key, [np.asarray(arrays[f"{prefix}.{key}.{i}"]) for i in range(length)])
    except KeyError as err:
        raise BundleError(f"discriminant state lacks array {err.args[0]!r}") from None
    return estimator

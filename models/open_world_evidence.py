"""The open-world signals of one bundle, as one object the offline jobs and the gate both use.

It holds the fitted scorers (class Mahalanobis and deep kNN on penultimate features, p-NormSoftmax
and Relative Uncertainty on logits, the DOCTOR perturbation step) and turns a batch's logits,
penultimate features and perturbed DOCTOR scores into the signal columns of
:data:`models.signals.OPEN_WORLD_SIGNALS`. Stored in the bundle under ``open_world/scorers/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.bundle import OPEN_WORLD_DIR, Bundle, open_world_scorer_stem
from models.errors import BundleError
from models.feature_scores import ClassMahalanobis, DeepKNN, PenultimateProbe
from models.fitted_scores import PNormSoftmax, RelativeUncertainty
from models.input_perturbation import PerturbedDoctor
from models.scores import energy, max_logit

_SCORER_TYPES = {"maha": ClassMahalanobis, "knn": DeepKNN, "pnorm": PNormSoftmax, "relu": RelativeUncertainty}


@dataclass
class OpenWorldScorers:
    """Fitted scorers plus the perturbation setting (``eps`` in pixel units, temperature)."""

    mahalanobis: ClassMahalanobis
    knn: DeepKNN
    pnorm: PNormSoftmax
    relu: RelativeUncertainty
    perturbation: dict[str, float]
    perturbation_grid: dict[str, float] = field(default_factory=dict)

    def columns(
        self, logits: np.ndarray, penultimate: np.ndarray, doctor_pert: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        """The open-world signal columns (``N`` each); ``doctor_pert`` only where it was computed."""
        out = {
            "maxlogit": np.asarray(max_logit(np.asarray(logits)), dtype=np.float64),
            "energy": np.asarray(energy(np.asarray(logits)), dtype=np.float64),
            "pnorm": self.pnorm.decision_function(logits),
            "relu": self.relu.decision_function(logits),
            "maha": self.mahalanobis.decision_function(penultimate),
            "knn": self.knn.decision_function(penultimate),
        }
        if doctor_pert is not None:
            out["doctor_pert"] = np.asarray(doctor_pert, dtype=np.float64)
        return out

    def perturbed_doctor(self, model: nn.Module, std: tuple[float, ...]) -> PerturbedDoctor:
        return PerturbedDoctor(model, std, self.perturbation["eps"], self.perturbation["temperature"])

    def summary(self) -> dict[str, Any]:
        return {
            "pnorm": {"p": self.pnorm.p_, "tau": self.pnorm.tau_},
            "relu": {"lambda": self.relu.lambda_, "temperature": self.relu.temperature_},
            "perturbation": dict(self.perturbation),
            "knn": {"k": self.knn.k, "bank": len(self.knn.bank_)},
        }

    def save(self, bundle: Bundle) -> None:
        """Write every scorer's JSON + arrays and record the setting in the manifest."""
        for name, scorer in self._by_name().items():
            config, arrays = scorer.to_state()
            bundle.write_detector_state(open_world_scorer_stem(name), config, arrays)
        section = dict(bundle.get(OPEN_WORLD_DIR) or {})
        section["scorers"] = {"names": sorted(_SCORER_TYPES), "perturbation": dict(self.perturbation)}
        bundle.set(OPEN_WORLD_DIR, section)

    def _by_name(self) -> dict[str, Any]:
        return {"maha": self.mahalanobis, "knn": self.knn, "pnorm": self.pnorm, "relu": self.relu}

    @classmethod
    def load(cls, bundle: Bundle) -> OpenWorldScorers:
        section = (bundle.get(OPEN_WORLD_DIR) or {}).get("scorers")
        if not section:
            raise BundleError(
                "this bundle has no open-world scorers: "
                "run `predgate open-world --bundle B --adopt` to fit them"
            )
        loaded = {}
        for name, kind in _SCORER_TYPES.items():
            loaded[name] = kind.from_state(*bundle.read_detector_state(open_world_scorer_stem(name)))
        return cls(
            loaded["maha"], loaded["knn"], loaded["pnorm"], loaded["relu"], dict(section["perturbation"])
        )


class OpenWorldProbe:
    """What the gate runs per batch for the open-world signals: the penultimate features (read
    from the extractor's own forward pass where it ran through the torch model, else one extra
    forward) and, when asked, the perturbed DOCTOR score."""

    def __init__(self, scorers: OpenWorldScorers, model: nn.Module, std: tuple[float, ...]) -> None:
        self.scorers = scorers
        self.probe = PenultimateProbe(model)
        self.perturbed = scorers.perturbed_doctor(model, std)

    def reset(self) -> None:
        """Forget the last forward's features: call before the extractor runs on a new batch."""
        self.probe.reset()

    def columns(self, x: torch.Tensor, logits: np.ndarray, *, perturbation: bool) -> dict[str, np.ndarray]:
        feats = self.probe.pop()
        if feats is None or feats.shape[0] != len(logits):
            _, feats = self.probe(x)
        penultimate = feats.flatten(1).double().cpu().numpy()
        doctor_pert = self.perturbed(x) if perturbation else None
        return self.scorers.columns(logits, penultimate, doctor_pert)

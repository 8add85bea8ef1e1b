"""What the CNN and its two probes say about a batch: the prediction, conductance and LCR.

:class:`EvidenceExtractor` is the one object that computes them, for the offline features and the
online gate alike (:mod:`models.gate` puts detectors and verdicts on top).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from models.conductance import LayerConductance, ShortcutConductance
from models.errors import ConfigError
from models.lcr import label_change_rate
from models.mutation import MutantSpec
from models.sequential_lcr import EarlyStopping

EarlyStoppedLCR = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(x, prediction) -> (lcr (N,), mutants_used (N,))``: a backend's early-stopping LCR."""


class MutantBackend(Protocol):
    """What the extractor needs of a mutant ensemble, whichever runs it: torch
    (:class:`models.lcr.MutantEnsemble`), torch with a shared prefix
    (:class:`models.prefix_ensemble.PrefixSharingEnsemble`) or ONNX Runtime
    (:class:`models.onnx_backend.OnnxMutantEnsemble`). Each checks its model (eval mode) and builds
    its state in its constructor; the extractor picks none of them by type."""

    specs: tuple[MutantSpec, ...]

    def __len__(self) -> int: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``M x N`` labels of ``x`` under each mutant, in spec order."""
        ...

    def early_stopped(self, stopping: EarlyStopping) -> EarlyStoppedLCR:
        """The early-stopping LCR of these mutants under ``stopping``, ready to call."""
        ...


@dataclass
class Evidence:
    """What the CNN and its two probes say about a batch (all on the CPU).

    ``conductance`` is ``N x C`` (None when not asked for), ``mutant_labels`` ``M x N`` and ``lcr``
    ``N`` (None without mutants); ``seconds`` holds wall time per stage. With early stopping,
    ``mutant_labels`` is None and ``mutants_used`` (``N``) says how many mutants each image needed.
    """

    logits: torch.Tensor
    prediction: torch.Tensor
    conductance: torch.Tensor | None = None
    mutant_labels: torch.Tensor | None = None
    lcr: torch.Tensor | None = None
    mutants_used: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class EvidenceExtractor:
    """Runs the CNN, the conductance of one layer and the mutant ensemble over a batch.

    Parameters
    ----------
    model : eval-mode CNN.
    conductance : :class:`ShortcutConductance` (prediction and conductance from one forward) or
        :class:`LayerConductance` (the 11-point form; the prediction comes from its alpha = 1 rows).
    ensemble : the kept mutants, or None when the bundle has none (yet).
    early_stopping : when set, LCR is the sequential test's (mutants in chunks, each image stops once
        its rule is settled) rather than the share over all mutants; the detectors of such a bundle
        learnt from the same test replayed on stored labels.
    forward : ``x -> logits`` of the plain forward pass (when no conductance is asked for) from
        another runtime (ONNX Runtime); None: ``model`` itself. ``model`` stays the torch CNN.
    """

    def __init__(
        self,
        model: nn.Module,
        conductance: ShortcutConductance | LayerConductance | None,
        ensemble: MutantBackend | None = None,
        early_stopping: EarlyStopping | None = None,
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if early_stopping is not None and ensemble is None:
            raise ConfigError("early-stopping LCR needs mutants")
        self.model = model
        self.forward = forward if forward is not None else model
        self.conductance = conductance
        self.ensemble = ensemble
        self.early_stopping = early_stopping
        # Chunks are built here, at start-up, not in the first request, by the backend itself.
        self._sequential = ensemble.early_stopped(early_stopping) if early_stopping is not None else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(
        self, x: torch.Tensor, *, conductance: bool = True, lcr: bool = True, early_stop: bool = True
    ) -> Evidence:
        """Evidence for ``x`` (``N x C x H x W``, normalised).

        ``early_stop=False`` labels ``x`` with every mutant even where the bundle stops early: the
        offline features keep all labels, from which the early-stopped LCR is replayed exactly.
        """
        seconds: dict[str, float] = {}
        x = x.to(self.device)
        start = time.perf_counter()
        cond = None
        if conductance:
            if self.conductance is None:
                raise ConfigError("this gate has no conductance layer configured")
            result = self.conductance.attribute(x)
            logits, cond = result.logits.detach(), result.conductance.detach().cpu()
            seconds["forward+conductance"] = time.perf_counter() - start
        else:
            with torch.no_grad():
                logits = self.forward(x)
            seconds["forward"] = time.perf_counter() - start
        logits = logits.float().cpu()
        prediction = logits.argmax(1)
        evidence = Evidence(logits=logits, prediction=prediction, conductance=cond, seconds=seconds)
        if lcr:
            if self.ensemble is None:
                raise ConfigError("this gate has no mutants: LCR is not available")
            start = time.perf_counter()
            if self.early_stopping is not None and early_stop:
                evidence.lcr, evidence.mutants_used = self.sequential_lcr(x, prediction)
            else:
                evidence.mutant_labels = self.ensemble.predict(x)
                evidence.lcr = label_change_rate(evidence.mutant_labels, prediction).float()
            seconds["lcr"] = time.perf_counter() - start
        return evidence

    def sequential_lcr(self, x: torch.Tensor, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Early-stopped ``(lcr (N,), mutants_used (N,))`` of ``x`` given the CNN's ``prediction``."""
        if self._sequential is None:
            raise ConfigError("this gate does not stop LCR early")
        return self._sequential(x.to(self.device), prediction)

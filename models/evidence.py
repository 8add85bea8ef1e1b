"""What the CNN and its two probes say about a batch: the prediction, conductance and LCR.

:class:`EvidenceExtractor` is the one object that computes them, for the offline features and the
online gate alike (:mod:`models.gate` puts detectors and verdicts on top).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from models.conductance import LayerConductance, ShortcutConductance
from models.errors import ConfigError
from models.lcr import MutantEnsemble, label_change_rate
from models.prefix_ensemble import PrefixSharingEnsemble
from models.sequential_lcr import EarlyStopping, SequentialLCR


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
    """

    def __init__(
        self,
        model: nn.Module,
        conductance: ShortcutConductance | LayerConductance | None,
        ensemble: MutantEnsemble | PrefixSharingEnsemble | None = None,
        early_stopping: EarlyStopping | None = None,
    ) -> None:
        if early_stopping is not None and ensemble is None:
            raise ConfigError("early-stopping LCR needs mutants")
        self.model = model
        self.conductance = conductance
        self.ensemble = ensemble
        self.early_stopping = early_stopping
        # Chunks are built here, at start-up, not in the first request. Prefix-sharing mutants run
        # their own chunks over the prefix computed once; an ensemble that knows how to build its
        # chunks (ONNX Runtime) keeps its backend.
        self._sequential: SequentialLCR | None = None
        if early_stopping is not None and not isinstance(ensemble, PrefixSharingEnsemble):
            self._sequential = SequentialLCR(
                ensemble.model,
                ensemble.specs,
                early_stopping.rule,
                early_stopping.chunk_size,
                early_stopping.min_mutants,
                getattr(ensemble, "chunk_factory", None),
            )

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
                logits = self.model(x)
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
        stopping = self.early_stopping
        if stopping is None or self.ensemble is None:
            raise ConfigError("this gate does not stop LCR early")
        x = x.to(self.device)
        if self._sequential is None:  # prefix-sharing mutants: the prefix runs once for all chunks
            assert isinstance(self.ensemble, PrefixSharingEnsemble)
            return self.ensemble.sequential_lcr(
                x, prediction, stopping.rule, stopping.chunk_size, stopping.min_mutants
            )
        return self._sequential(x, prediction)

"""Adaptive attacks: a white-box PGD that knows the gate and tries to get a wrong answer accepted.

A detector that only stops attacks which ignore it proves nothing (Carlini & Wagner 2017; Tramer et
al. 2020). Here the attacker differentiates the whole verdict of one signal set: the CNN, the
conductance of the bundle's layer (the shortcut form, exact when the head is affine), the
conductance detector, the softmax and feature signals, and the unified classifier, all as torch
functions of the pixels (:class:`DifferentiableGate`). LCR counts labels, which has no gradient, so
the attacker replaces it by a smooth surrogate (each mutant's softmax mass off the CNN's label,
averaged: the BPDA idea of Athalye et al. 2018) over mutants it either knows (the bundle's) or draws
itself with the bundle's operator and rate.

:func:`adaptive_pgd` maximises ``-max(margin, -kappa) - lam * [margin < 0] * max(logit(u) - logit(t)
+ delta, 0)``: first flip the label (margin = true logit minus the best other), then, once flipped,
push the unified score ``u`` below the operating point's threshold ``t``. Success is judged
afterwards by the real gate (:meth:`models.gate.Gate.run`) on the uint8 rounding, never by this
module's own forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from models.conductance import ShortcutConductance
from models.detectors import Detector
from models.errors import ConfigError
from models.feature_scores import find_head
from models.gate import Gate, SignalSet
from models.mutation import MutantSpec, mutant_tensors, plan_mutant
from models.preprocess import Normalisation
from models.scores import energy, max_logit
from models.signals import SOFTMAX_SIGNALS

# Signals this module can differentiate. "lcr" through its surrogate; the fitted logit scores
# (pnorm, relu) and the perturbed DOCTOR score are not reimplemented here.
DIFFERENTIABLE_SIGNALS = ("cond", "lcr", *SOFTMAX_SIGNALS, "maxlogit", "energy", "maha", "knn")
DIFFERENTIABLE_KINDS = ("nn", "lda", "qda")  # random forests are not


def _wrong_probability(detector: Detector, x: Tensor) -> Tensor:
    """The detector's P(wrong) as a torch function, computed as it scores: standardise, then an
    MLP and a sigmoid, or sklearn's binary LDA / QDA posterior from the fitted arrays."""
    mean = torch.as_tensor(detector.mean_, dtype=torch.float64)
    scale = torch.as_tensor(detector.scale_, dtype=torch.float64)
    z = (x.double() - mean) / scale
    kind = getattr(detector, "kind", "nn")
    if kind == "nn":
        network = detector.network_
        return torch.sigmoid(network(z.to(next(network.parameters()).dtype)).reshape(-1)).double()
    if kind == "lda":
        estimator = detector.estimator_  # type: ignore[attr-defined]
        coef = torch.as_tensor(estimator.coef_, dtype=torch.float64).reshape(-1)
        intercept = float(np.asarray(estimator.intercept_).reshape(-1)[0])
        return torch.sigmoid(z @ coef + intercept)
    if kind == "qda":  # sklearn's log posteriors, then the softmax of the two classes
        estimator = detector.estimator_  # type: ignore[attr-defined]
        log_post = []
        for i in range(len(estimator.classes_)):
            rotation = torch.as_tensor(estimator.rotations_[i], dtype=torch.float64)
            scaling = torch.as_tensor(estimator.scalings_[i], dtype=torch.float64)
            centred = z - torch.as_tensor(estimator.means_[i], dtype=torch.float64)
            norm2 = ((centred @ (rotation * scaling**-0.5)) ** 2).sum(1)
            log_post.append(-0.5 * (norm2 + torch.log(scaling).sum()) + float(np.log(estimator.priors_[i])))
        return torch.sigmoid(log_post[1] - log_post[0])
    raise ConfigError(f"the adaptive attack differentiates MLP, LDA and QDA detectors, not kind {kind!r}")


def differentiable(chosen: SignalSet) -> str | None:
    """None when :class:`DifferentiableGate` can attack ``chosen``, else the reason it cannot."""
    unsupported = [s for s in chosen.signals if s not in DIFFERENTIABLE_SIGNALS]
    if unsupported:
        return f"reads {unsupported}, not differentiated here"
    kind = getattr(chosen.classifier, "kind", None)
    if kind not in DIFFERENTIABLE_KINDS:
        return f"its unified classifier is of kind {kind!r} (differentiated: {list(DIFFERENTIABLE_KINDS)})"
    return None


class _Capture:
    """Keeps, with its graph, the output of one module and the input of another during one forward."""

    def __init__(self, layer: nn.Module, head: nn.Module) -> None:
        self.activation: Tensor | None = None
        self.features: Tensor | None = None
        self._handles = [
            layer.register_forward_hook(self._keep_activation),
            head.register_forward_hook(self._keep_features),
        ]

    def _keep_activation(self, module: nn.Module, inputs: object, output: Tensor) -> None:
        if self.activation is None:
            self.activation = output

    def _keep_features(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self.features is None:
            self.features = inputs[0].flatten(1)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class GateTerms:
    """One differentiable pass: the CNN's logits, the set's unified score ``u`` (P(wrong)) and the
    signal columns it was computed from (``lcr`` is the surrogate, or the hard rate when asked)."""

    logits: Tensor
    unified: Tensor
    columns: dict[str, Tensor]


class DifferentiableGate:
    """The unified score of one signal set as a torch function of ``N x C x H x W`` pixels in [0, 1].

    Parameters
    ----------
    gate : the bundle's loaded gate (its model, shortcut conductance, detectors and scorers are
        read, never modified).
    normalisation : the bundle's, applied to the pixels first.
    signal_set : the set to attack (None: the gate's default).
    mutants : the specs whose surrogate LCR the attacker differentiates (needed when the set
        reads ``lcr``).
    temperature : of the mutants' softmax in the surrogate.
    """

    def __init__(
        self,
        gate: Gate,
        normalisation: Normalisation,
        signal_set: str | None = None,
        mutants: Sequence[MutantSpec] = (),
        temperature: float = 1.0,
    ) -> None:
        self.gate = gate
        self.set: SignalSet = gate.signal_set(signal_set)
        reason = differentiable(self.set)
        if reason is not None:
            raise ConfigError(
                f"the adaptive attack cannot differentiate signal set {self.set.name!r}: {reason}"
            )
        self.model = gate.extractor.model
        if "cond" in self.set.signals and not isinstance(gate.extractor.conductance, ShortcutConductance):
            raise ConfigError(
                "the adaptive attack needs the conductance shortcut (an affine head after the layer); "
                "this bundle computes conductance in the general form"
            )
        if "lcr" in self.set.signals and not mutants:
            raise ConfigError(f"signal set {self.set.name!r} reads LCR: give the attacker mutants")
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.mutants = tuple(mutants)
        self.temperature = temperature
        self.mean = torch.tensor(normalisation.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(normalisation.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._patches = [mutant_tensors(self.model, spec) for spec in self.mutants]
        self.threshold = {name: p.threshold for name, p in self.set.operating_points.items()}

    # ----------------------------------------------------------------------------- pieces
    def _conductance(self, activation: Tensor, prediction: Tensor) -> Tensor:
        shortcut = self.gate.extractor.conductance
        assert isinstance(shortcut, ShortcutConductance)
        jac = shortcut.head_jacobian.to(activation)[prediction]
        delta = activation - shortcut.baseline_activation.to(activation)
        n, c = delta.shape[:2]
        if jac.ndim == 2:
            return jac * delta.reshape(n, c, -1).sum(2)
        return (jac * delta).reshape(n, c, -1).sum(2)

    def _cond_score(self, conductance: Tensor, prediction: Tensor) -> Tensor:
        detector = self.set.cond_detector or self.gate.cond_detector
        if detector is None:
            raise ConfigError("this gate has no conductance detector")
        x = conductance.double()
        if self.gate.cond_inputs == "conductance+class":
            assert self.gate.num_classes is not None
            x = torch.cat([x, torch.eye(self.gate.num_classes, dtype=x.dtype)[prediction]], 1)
        return _wrong_probability(detector, x)

    def _lcr(self, z: Tensor, prediction: Tensor, hard: bool) -> Tensor:
        rates = []
        for patch in self._patches:
            logits = functional_call(self.model, patch, (z,))
            if hard:
                rates.append((logits.argmax(1) != prediction).double())
            else:
                p = torch.softmax(logits / self.temperature, 1)
                rates.append(1.0 - p.gather(1, prediction[:, None]).squeeze(1).double())
        return torch.stack(rates).mean(0)

    def _maha(self, features: Tensor) -> Tensor:
        scorer = self.gate.open_world.scorers.mahalanobis  # type: ignore[union-attr]
        means = torch.as_tensor(scorer.means_, dtype=torch.float64)
        precision = torch.as_tensor(scorer.precision_, dtype=torch.float64)
        diff = features.double()[:, None, :] - means[None]
        return torch.einsum("ncd,de,nce->nc", diff, precision, diff).min(1).values

    def _knn(self, features: Tensor) -> Tensor:
        scorer = self.gate.open_world.scorers.knn  # type: ignore[union-attr]
        bank = torch.as_tensor(scorer.bank_, dtype=torch.float32)
        norm = features.float().norm(dim=1, keepdim=True)
        q = features.float() / torch.where(norm > 0, norm, torch.ones_like(norm))
        kth = torch.topk(q @ bank.T, scorer.k, dim=1).values[:, -1].double()
        return torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=1e-12))

    # ----------------------------------------------------------------------------- forward
    def __call__(self, pixels: Tensor, *, hard_lcr: bool = False) -> GateTerms:
        """Logits and unified score of ``pixels``; ``hard_lcr`` uses the true label change rate of
        the given mutants instead of the surrogate (for checking against the real gate)."""
        z = (pixels - self.mean) / self.std
        shortcut = self.gate.extractor.conductance
        layer = shortcut.layer if isinstance(shortcut, ShortcutConductance) else None
        _, head = find_head(self.model)
        capture = _Capture(layer if layer is not None else head, head)
        try:
            logits = self.model(z)
        finally:
            capture.close()
        prediction = logits.argmax(1).detach()
        columns: dict[str, Tensor] = {}
        for name in self.set.signals:
            if name == "cond":
                assert capture.activation is not None
                columns[name] = self._cond_score(
                    self._conductance(capture.activation, prediction), prediction
                )
            elif name == "lcr":
                columns[name] = self._lcr(z, prediction, hard_lcr)
            elif name in SOFTMAX_SIGNALS:
                columns[name] = SOFTMAX_SIGNALS[name](logits).double()
            elif name == "maxlogit":
                columns[name] = max_logit(logits).double()
            elif name == "energy":
                columns[name] = energy(logits).double()
            elif name == "maha":
                columns[name] = self._maha(capture.features)  # type: ignore[arg-type]
            elif name == "knn":
                columns[name] = self._knn(capture.features)  # type: ignore[arg-type]
        matrix = torch.stack([columns[name] for name in self.set.signals], 1)
        return GateTerms(logits, _wrong_probability(self.set.classifier, matrix), columns)


def redraw_mutants(model: nn.Module, like: Sequence[MutantSpec], n: int, seed: int) -> list[MutantSpec]:
    """``n`` mutants of the bundle's operator and rate from seeds the bundle did not use: an
    attacker who knows how the mutants are made but not which were kept."""
    if not like:
        raise ConfigError("the bundle has no mutants to imitate")
    used = {spec.seed for spec in like}
    seeds = [s for s in range(seed, seed + 10 * n + len(used)) if s not in used][:n]
    return [plan_mutant(model, like[0].operator, like[0].rate, s) for s in seeds]


@dataclass(frozen=True)
class AdaptiveSpec:
    """Budget and loss of :func:`adaptive_pgd` (l-inf, pixel units)."""

    eps: float = 0.1
    steps: int = 50
    alpha: float | None = None
    lam: float = 1.0
    kappa: float = 5.0
    delta: float = 1.0
    operating_point: str | None = None

    def __post_init__(self) -> None:
        if self.eps <= 0 or self.steps < 1 or self.lam < 0:
            raise ConfigError(f"need eps > 0, steps >= 1 and lam >= 0, got {self}")

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps


def _logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-12, 1 - 1e-12)
    return torch.log(p) - torch.log1p(-p)


def adaptive_pgd(
    dgate: DifferentiableGate, pixels: Tensor, labels: Tensor, spec: AdaptiveSpec, seed: int = 0
) -> Tensor:
    """l-inf PGD (random start, sign steps) on the flip-then-hide loss; per image the iterate that
    the differentiable gate scores as wrong and accepted with the lowest score is kept (else the
    last), so more steps never lose a success."""
    point = dgate.set.point(spec.operating_point)
    t_logit = float(_logit(torch.tensor(point.threshold, dtype=torch.float64)))
    generator = torch.Generator().manual_seed(seed)
    x0 = pixels.detach().float()
    x = (x0 + torch.empty_like(x0).uniform_(-spec.eps, spec.eps, generator=generator)).clamp(0, 1)
    best = x.clone()
    best_score = torch.full((len(x0),), float("inf"), dtype=torch.float64)
    found = torch.zeros(len(x0), dtype=torch.bool)
    for _ in range(spec.steps):
        x.requires_grad_(True)
        terms = dgate(x)
        true = terms.logits.gather(1, labels[:, None]).squeeze(1)
        other = terms.logits.scatter(1, labels[:, None], float("-inf")).max(1).values
        margin = true - other
        hide = torch.clamp(_logit(terms.unified) - t_logit + spec.delta, min=0.0)
        # The hide term acts only once the label is flipped: before that, lowering P(wrong) would
        # mean making the (right) prediction more confident, the opposite of the attack.
        flipped = (margin < 0).detach().double()
        objective = -torch.clamp(margin, min=-spec.kappa).double() - spec.lam * flipped * hide
        (grad,) = torch.autograd.grad(objective.sum(), x)
        with torch.no_grad():
            success = (margin < 0) & (terms.unified.detach() <= point.threshold)
            better = success & (terms.unified.detach() < best_score)
            best[better] = x.detach()[better]
            best_score[better] = terms.unified.detach()[better]
            found |= success
            x = x.detach() + spec.step_size * grad.sign()
            x = torch.min(torch.max(x, x0 - spec.eps), x0 + spec.eps).clamp(0, 1)
    best[~found] = x.detach()[~found]
    return best.detach()

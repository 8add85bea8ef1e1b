"""Mutated copies of a CNN for the label change rate, described by a small spec instead of weights.

A mutant (Wang et al. 2018, "Adversarial sample detection for deep neural network through model
mutation testing") is the original CNN with a share of its convolutional filters (output channels
of every ``nn.Conv2d``, depthwise and grouped ones included) changed by one operator:

* ``NAI`` negates the filter's weights and its bias (if the conv has one);
* ``GF`` redraws the filter's weights from a normal with the mean and std of its layer's weights;
* ``WS`` permutes the weights inside the filter;
* ``NS`` swaps the filter with another filter of the same layer (both filters count as mutated).

A :class:`MutantSpec` (operator, rate, seed, chosen filters) plus the original weights determine
the mutant exactly, so a bundle stores specs, never weight copies; :func:`mutant_weights_hash`
lets it check that regeneration still gives the same weights.
:func:`models.mutant_search.generate_mutants` applies the acceptance rule of the method (keep a
mutant only if its validation accuracy is at least 0.9 x the original's). Batched evaluation of many
mutants lives in :mod:`models.lcr`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.errors import BundleError, ConfigError, PredgateError

# A mutant's changed rows, per parameter name: (output-channel indices (K,), new rows K x ...).
Patches = dict[str, tuple[torch.Tensor, torch.Tensor]]

# Independent random streams derived from one spec seed, so that choosing filters and drawing
# new values never share numbers (changing one would otherwise shift the other).
_PLAN_STREAM = 0
_VALUES_STREAM = 1


class MutationError(PredgateError):
    """Mutant generation could not keep enough mutants within its attempt budget."""

    def __init__(self, message: str, partial: MutantSet | None = None) -> None:
        super().__init__(message)
        self.partial = partial


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every ``nn.Conv2d`` in ``named_modules()`` order: the order filter indices refer to."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def count_filters(model: nn.Module) -> int:
    """Number of mutable filters: the sum of output channels over all convolutions."""
    return sum(conv.out_channels for _, conv in conv_layers(model))


def filters_for_rate(model: nn.Module, rate: float) -> int:
    """Filters a mutant at ``rate`` changes: ``max(1, round(rate x total))``; never 0 on small models."""
    return max(1, round(rate * count_filters(model)))


def _param_name(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


# ---------------------------------------------------------------------------------------------
# Operators. Each maps (conv, chosen output channels, rng) to new rows for the touched parameters,
# computed from the original weights only, so that regeneration is a pure function of the spec.
# ---------------------------------------------------------------------------------------------
_Operator = Callable[[nn.Conv2d, list[int], np.random.Generator], dict[str, tuple[list[int], torch.Tensor]]]


def _nai(conv: nn.Conv2d, channels: list[int], rng: np.random.Generator) -> dict:
    """Neuron activation inverse: the filter's pre-activation changes sign (before BN, if any)."""
    out = {"weight": (channels, -conv.weight.detach()[channels])}
    if conv.bias is not None:
        out["bias"] = (channels, -conv.bias.detach()[channels])
    return out


def _gf(conv: nn.Conv2d, channels: list[int], rng: np.random.Generator) -> dict:
    """Gaussian fuzzing with the layer's own weight statistics, so the scale stays plausible."""
    weight = conv.weight.detach()
    mean, std = weight.double().mean().item(), weight.double().std().item()
    draws = rng.normal(mean, std, size=(len(channels), *weight.shape[1:]))
    return {"weight": (channels, torch.as_tensor(draws).to(weight.dtype))}


def _ws(conv: nn.Conv2d, channels: list[int], rng: np.random.Generator) -> dict:
    """Weight shuffling: same values (and norm) inside the filter, in a different arrangement."""
    weight = conv.weight.detach()
    rows = []
    for c in channels:
        flat = weight[c].reshape(-1)
        perm = torch.as_tensor(rng.permutation(flat.numel()))
        rows.append(flat[perm].reshape(weight.shape[1:]))
    return {"weight": (channels, torch.stack(rows))}


def _ns(conv: nn.Conv2d, channels: list[int], rng: np.random.Generator) -> dict:
    """Neuron switch: ``channels`` lists swap pairs (a0, b0, a1, b1, ...), chosen when planning."""
    order = [c for i in range(0, len(channels), 2) for c in (channels[i + 1], channels[i])]
    out = {"weight": (channels, conv.weight.detach()[order])}
    if conv.bias is not None:
        out["bias"] = (channels, conv.bias.detach()[order])
    return out


OPERATORS: dict[str, _Operator] = {"NAI": _nai, "GF": _gf, "WS": _ws, "NS": _ns}


def get_operator(name: str) -> _Operator:
    """The operator called ``name``; the error lists the valid ones."""
    try:
        return OPERATORS[name]
    except KeyError as exc:
        raise ConfigError(f"unknown mutation operator {name!r}; valid: {sorted(OPERATORS)}") from exc


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MutantSpec:
    """Everything that, together with the original weights, defines one mutant.

    ``filters`` holds ``(conv module name, output channel)`` pairs. For ``NS`` they come in swap
    pairs ``(a0, b0, a1, b1, ...)``, each pair in one layer; for the other operators they are in
    model order. The values drawn by ``GF`` and ``WS`` also derive from ``seed``.
    """

    operator: str
    rate: float
    seed: int
    filters: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        get_operator(self.operator)
        if not 0.0 < self.rate <= 1.0:
            raise ConfigError(f"mutation rate must be in (0, 1], got {self.rate}")
        if self.seed < 0:
            raise ConfigError(f"mutant seed must be >= 0, got {self.seed}")
        if not self.filters:
            raise ConfigError("a mutant must change at least one filter")
        if len(set(self.filters)) != len(self.filters):
            raise ConfigError("a mutant lists the same filter twice")
        if self.operator == "NS" and len(self.filters) % 2:
            raise ConfigError("an NS mutant needs filters in swap pairs")

    @property
    def n_filters(self) -> int:
        """How many filters this mutant changes (both filters of each NS swap count)."""
        return len(self.filters)

    def to_dict(self) -> dict[str, Any]:
        return {
            "operator": self.operator,
            "rate": self.rate,
            "seed": self.seed,
            "filters": [[name, index] for name, index in self.filters],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MutantSpec:
        try:
            filters = tuple((str(name), int(index)) for name, index in data["filters"])
            return cls(str(data["operator"]), float(data["rate"]), int(data["seed"]), filters)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid mutant spec {data!r}: {exc}") from exc


def plan_mutant(
    model: nn.Module,
    operator: str,
    rate: float,
    seed: int,
    convs: list[tuple[str, nn.Conv2d]] | None = None,
) -> MutantSpec:
    """Choose the filters of one mutant, uniformly without replacement, from ``seed``.

    ``max(1, round(rate x total filters of the model))`` filters change, drawn from ``convs``
    (default: every conv; a subset confines mutants to later layers). ``NS`` changes that number
    rounded up to an even one, as disjoint pairs within a layer (layers with one output channel are
    skipped).
    """
    get_operator(operator)
    convs = conv_layers(model) if convs is None else convs
    if not convs:
        raise ConfigError("the model has no nn.Conv2d layers to mutate")
    flat = [(name, c) for name, conv in convs for c in range(conv.out_channels)]
    n = max(1, round(rate * count_filters(model)))
    if n > len(flat):
        raise ConfigError(f"rate {rate} asks for {n} filters but the convs to mutate hold only {len(flat)}")
    rng = _rng(seed, _PLAN_STREAM)
    if operator != "NS":
        chosen = sorted(rng.choice(len(flat), size=n, replace=False).tolist())
        return MutantSpec(operator, rate, seed, tuple(flat[i] for i in chosen))
    return MutantSpec(operator, rate, seed, _plan_swaps(convs, math.ceil(n / 2), rng))


def _plan_swaps(
    convs: list[tuple[str, nn.Conv2d]], n_pairs: int, rng: np.random.Generator
) -> tuple[tuple[str, int], ...]:
    """Disjoint same-layer pairs: first filters in a random order, each with a random free partner."""
    sizes = {name: conv.out_channels for name, conv in convs if conv.out_channels >= 2}
    flat = [(name, c) for name, size in sizes.items() for c in range(size)]
    free = {name: set(range(size)) for name, size in sizes.items()}
    pairs: list[tuple[str, int]] = []
    for i in rng.permutation(len(flat)).tolist():
        if len(pairs) == 2 * n_pairs:
            break
        name, a = flat[i]
        if a not in free[name] or len(free[name]) < 2:
            continue
        free[name].discard(a)
        b = int(rng.choice(sorted(free[name])))
        free[name].discard(b)
        pairs += [(name, a), (name, b)]
    if len(pairs) < 2 * n_pairs:
        raise ConfigError(f"NS needs {n_pairs} disjoint filter pairs; the model only has room for fewer")
    return tuple(pairs)


# ---------------------------------------------------------------------------------------------
# Regeneration
# ---------------------------------------------------------------------------------------------
def mutant_patches(model: nn.Module, spec: MutantSpec) -> Patches:
    """The rows a mutant changes: ``{param name: (channels (K,), new rows K x ...)}``.

    Sparse on purpose: a mutant differs from the original in a handful of filters, so this is
    what the loop strategy writes in place and what a cache keeps per mutant.
    """
    operator = get_operator(spec.operator)
    convs = dict(conv_layers(model))
    by_layer: dict[str, list[int]] = {}
    for name, c in spec.filters:
        conv = convs.get(name)
        if conv is None or not 0 <= c < conv.out_channels:
            raise BundleError(f"mutant spec names filter {c} of {name!r}, which this model does not have")
        by_layer.setdefault(name, []).append(c)
    rng = _rng(spec.seed, _VALUES_STREAM)
    patches: Patches = {}
    with torch.no_grad():
        for name, channels in by_layer.items():  # spec order, so the draws are reproducible
            for attr, (index, rows) in operator(convs[name], channels, rng).items():
                param = getattr(convs[name], attr)
                rows = rows.to(dtype=param.dtype, device=param.device).contiguous()
                patches[_param_name(name, attr)] = (torch.tensor(index, device=param.device), rows)
    return patches


def mutant_tensors(model: nn.Module, spec: MutantSpec) -> dict[str, torch.Tensor]:
    """Full new tensors for the parameters a mutant touches (and only those), keyed like ``state_dict``."""
    params = dict(model.named_parameters())
    out = {}
    for name, (index, rows) in mutant_patches(model, spec).items():
        out[name] = params[name].detach().clone().index_copy_(0, index, rows)
    return out


def mutant_weights_hash(model: nn.Module, spec: MutantSpec) -> str:
    """sha256 of the regenerated touched tensors: a bundle records it to detect drift on reload."""
    digest = hashlib.sha256()
    for name, tensor in sorted(mutant_tensors(model, spec).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Acceptance
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MutantSet:
    """Kept mutants and the record of every candidate tried, for the acceptance-rate report.

    ``accuracies[i]`` is the validation accuracy of ``specs[i]``; ``candidate_*`` list all
    candidates in the order tried (seeds ``seed, seed + 1, ...``).
    """

    specs: tuple[MutantSpec, ...]
    accuracies: tuple[float, ...]
    original_accuracy: float
    min_relative_accuracy: float
    total_filters: int
    candidate_seeds: tuple[int, ...] = field(default=())
    candidate_accuracies: tuple[float, ...] = field(default=())
    candidate_kept: tuple[bool, ...] = field(default=())

    @property
    def attempts(self) -> int:
        return len(self.candidate_seeds)

    @property
    def acceptance_rate(self) -> float:
        return sum(self.candidate_kept) / self.attempts if self.attempts else float("nan")

    @property
    def filters_per_mutant(self) -> tuple[int, ...]:
        return tuple(spec.n_filters for spec in self.specs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "specs": [spec.to_dict() for spec in self.specs],
            "accuracies": list(self.accuracies),
            "original_accuracy": self.original_accuracy,
            "min_relative_accuracy": self.min_relative_accuracy,
            "total_filters": self.total_filters,
            "candidate_seeds": list(self.candidate_seeds),
            "candidate_accuracies": list(self.candidate_accuracies),
            "candidate_kept": list(self.candidate_kept),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MutantSet:
        try:
            out = cls(
                specs=tuple(MutantSpec.from_dict(s) for s in data["specs"]),
                accuracies=tuple(float(a) for a in data["accuracies"]),
                original_accuracy=float(data["original_accuracy"]),
                min_relative_accuracy=float(data["min_relative_accuracy"]),
                total_filters=int(data["total_filters"]),
                candidate_seeds=tuple(int(s) for s in data.get("candidate_seeds", ())),
                candidate_accuracies=tuple(float(a) for a in data.get("candidate_accuracies", ())),
                candidate_kept=tuple(bool(k) for k in data.get("candidate_kept", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid mutant set: {exc}") from exc
        if len(out.accuracies) != len(out.specs):
            raise BundleError("mutant set has a different number of specs and accuracies")
        return out

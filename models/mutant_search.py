"""The acceptance rule of the method: mutants are kept only if their validation accuracy is at
least a share (0.9) of the original CNN's.

Candidates are planned by :mod:`models.mutation` (all convs) or :mod:`models.prefix_ensemble`
(convs inside given modules) and evaluated in batches by the matching ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from models.errors import ConfigError
from models.lcr import MutantEnsemble, predict_model
from models.mutation import MutantSet, MutantSpec, MutationError, count_filters, get_operator, plan_mutant
from models.prefix_ensemble import PrefixSharingEnsemble, plan_mutant_in


def _accuracy(labels: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy per row of ``labels`` (M x N) against ``y`` (N,)."""
    return (labels == y.view(1, -1)).double().mean(1)


def generate_mutants(
    model: nn.Module,
    operator: str,
    rate: float,
    n_mutants: int,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    min_relative_accuracy: float = 0.9,
    max_attempts: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    strategy: str = "auto",
    progress: bool = True,
    modules: Sequence[str] | None = None,
) -> MutantSet:
    """Try candidates with seeds ``seed, seed + 1, ...`` until ``n_mutants`` keep enough accuracy.

    A candidate is kept when its accuracy on ``(x_val, y_val)`` is ``>= min_relative_accuracy x``
    the original model's. Candidates are evaluated in rounds of exactly as many as are still
    missing, so the kept set is the same as trying them one by one.

    Parameters
    ----------
    model : eval-mode CNN.
    x_val : ``N x C x H x W`` normalised validation images; ``y_val`` : ``(N,)`` labels.
    max_attempts : candidates to try before giving up; default ``10 x n_mutants``.
    batch_size : validation images per forward.
    strategy : how mutants are evaluated, see :class:`models.lcr.MutantEnsemble`.
    modules : draw filters only from convs inside these modules (e.g. ``["layer3"]``): all mutants
        then share the unmutated prefix, evaluated once by
        :class:`models.prefix_ensemble.PrefixSharingEnsemble`.

    Raises
    ------
    MutationError
        When the attempt cap is hit first; ``.partial`` holds what was tried.
    """

    def plan(candidate_seed: int) -> MutantSpec:
        if modules:
            return plan_mutant_in(model, operator, rate, candidate_seed, modules)
        return plan_mutant(model, operator, rate, candidate_seed)

    def ensemble_of(specs: list[MutantSpec]) -> MutantEnsemble | PrefixSharingEnsemble:
        if modules:
            return PrefixSharingEnsemble(model, specs, modules[0] if len(modules) == 1 else None)
        return MutantEnsemble(model, specs, strategy=strategy)

    get_operator(operator)
    if n_mutants < 1:
        raise ConfigError(f"n_mutants must be >= 1, got {n_mutants}")
    max_attempts = 10 * n_mutants if max_attempts is None else max_attempts
    if max_attempts < n_mutants:
        raise ConfigError(f"max_attempts ({max_attempts}) is below n_mutants ({n_mutants})")
    if len(x_val) != len(y_val) or len(x_val) == 0:
        raise ConfigError(f"x_val ({len(x_val)}) and y_val ({len(y_val)}) must be equally long and non-empty")
    y_val = torch.as_tensor(y_val).long().cpu()
    original = _accuracy(predict_model(model, x_val, batch_size).view(1, -1), y_val).item()
    threshold = min_relative_accuracy * original

    seeds: list[int] = []
    accs: list[float] = []
    kept: list[bool] = []
    kept_specs: list[MutantSpec] = []
    bar = None
    if progress:
        where = f" in {list(modules)}" if modules else ""
        bar = tqdm(total=n_mutants, desc=f"mutants {operator}@{rate}{where}", unit="kept")
    try:
        while len(kept_specs) < n_mutants and len(seeds) < max_attempts:
            count = min(n_mutants - len(kept_specs), max_attempts - len(seeds))
            round_seeds = list(range(seed + len(seeds), seed + len(seeds) + count))
            specs = [plan(s) for s in round_seeds]
            ensemble = ensemble_of(specs)
            starts = range(0, len(x_val), batch_size)
            if bar is not None:  # a round of 100 candidates takes minutes on a CPU: show it moving
                starts = tqdm(starts, desc=f"  evaluating {count} candidates", leave=False, unit="batch")
            labels = torch.cat([ensemble.predict(x_val[i : i + batch_size]) for i in starts], dim=1)
            for spec, acc in zip(specs, _accuracy(labels, y_val).tolist(), strict=True):
                ok = acc >= threshold
                seeds.append(spec.seed)
                accs.append(acc)
                kept.append(ok)
                if ok:
                    kept_specs.append(spec)
            if bar is not None:
                bar.n = len(kept_specs)
                bar.set_postfix(tried=len(seeds))
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()

    result = MutantSet(
        specs=tuple(kept_specs),
        accuracies=tuple(a for a, k in zip(accs, kept, strict=True) if k),
        original_accuracy=original,
        min_relative_accuracy=min_relative_accuracy,
        total_filters=count_filters(model),
        candidate_seeds=tuple(seeds),
        candidate_accuracies=tuple(accs),
        candidate_kept=tuple(kept),
    )
    if len(kept_specs) < n_mutants:
        n_filters = kept_specs[0].n_filters if kept_specs else plan(seed).n_filters
        raise MutationError(
            f"kept {len(kept_specs)} of {len(seeds)} candidate {operator} mutants (needed {n_mutants}) with "
            f"accuracy >= {min_relative_accuracy:g} x original {original:.4f}; each changes {n_filters} of "
            f"{result.total_filters} filters at rate "
            f"{rate:g}{' in ' + str(list(modules)) if modules else ''}; try a lower rate or a larger "
            "max_attempts",
            partial=result,
        )
    return result


def generate_mutants_in(
    model: nn.Module,
    operator: str,
    rate: float,
    n_mutants: int,
    modules: Sequence[str],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    **kwargs: Any,
) -> MutantSet:
    """:func:`generate_mutants` restricted to ``modules`` (same acceptance rule)."""
    return generate_mutants(model, operator, rate, n_mutants, x_val, y_val, modules=modules, **kwargs)

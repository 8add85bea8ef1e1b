"""Cost of each piece of evidence in forward-equivalents: time over one plain forward pass of the
same batch, measured in the same process (the machine is noisy; ratios travel, seconds do not).

The report prices each signal set with it (:func:`signal_set_cost`) and the benchmarks time with it."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from models.evidence import EvidenceExtractor


def timed_runs(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    synchronize: Callable[[], None] | None = None,
) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` untimed ones.

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so that queued
    device work is counted in the call that queued it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    synchronize: Callable[[], None] | None = None,
) -> float:
    """Median of :func:`timed_runs`: the median, not the mean, because other processes share the cores."""
    return statistics.median(timed_runs(fn, repeats, warmup, synchronize))


def forward_equivalents(seconds: float, forward_seconds: float) -> float:
    """``seconds`` in units of one plain forward pass of the same batch (NaN when that is not positive)."""
    return seconds / forward_seconds if forward_seconds > 0 else math.nan


def flop_floor(n_mutants: int) -> int:
    """Forward passes a gated prediction cannot do without when the conductance shortcut applies.

    The shortcut takes conductance from the prediction's own forward pass, and each mutant's label
    needs one forward of its own: ``1 + n_mutants``.
    """
    if n_mutants < 0:
        raise ValueError(f"n_mutants must be >= 0, got {n_mutants}")
    return 1 + n_mutants


def sequential_lcr_call(extractor: EvidenceExtractor, x: torch.Tensor) -> Callable[[], object]:
    """The early-stopping LCR of ``x`` as a call to time, given the prediction the gate already has."""
    with torch.no_grad():
        prediction = extractor.model(x.to(extractor.device)).argmax(1).cpu()
    return lambda: extractor.sequential_lcr(x, prediction)


def stage_costs(extractor: EvidenceExtractor, x: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Seconds for a plain forward, forward+conductance and LCR on ``x``, and their ratios.

    Each repeat times a forward right before and after each stage and takes the stage's ratio to
    their mean, so load that drifts while a benchmark runs (this machine is shared) cancels out;
    the reported ratio is the median over repeats. Returns ``forward_s``, ``conductance_s`` (forward
    included), ``lcr_s`` (mutants only) and the ratios as ``*_fe``.
    """
    x = x.to(extractor.device)

    def forward() -> object:
        with torch.no_grad():
            return extractor.model(x)

    stages: dict[str, Callable[[], object]] = {
        "conductance": lambda: extractor(x, conductance=True, lcr=False),
    }
    if extractor.early_stopping is not None:  # the LCR the gate computes: chunks until settled
        stages["lcr"] = sequential_lcr_call(extractor, x)
    elif extractor.ensemble is not None:
        ensemble = extractor.ensemble
        stages["lcr"] = lambda: ensemble.predict(x)
    for fn in (forward, *stages.values()):  # warm-up
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in ("forward", *stages)}
    ratios: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(repeats):
        for name, fn in stages.items():
            before = median_seconds(forward, 1, warmup=0)
            took = median_seconds(fn, 1, warmup=0)
            after = median_seconds(forward, 1, warmup=0)
            seconds["forward"] += [before, after]
            seconds[name].append(took)
            ratios[name].append(took / ((before + after) / 2))
    out = {f"{name}_s": statistics.median(values) for name, values in seconds.items()}
    out["forward_fe"] = 1.0
    out.update({f"{name}_fe": statistics.median(values) for name, values in ratios.items()})
    return out


def signal_set_cost(signals: tuple[str, ...] | list[str], costs: dict[str, float]) -> float:
    """Forward-equivalents per image to reach a verdict with ``signals`` (detectors are negligible)."""
    total = costs["conductance_fe"] if "cond" in signals else 1.0
    if "lcr" in signals:
        total += costs.get("lcr_fe", float("nan"))
    if "doctor_pert" in signals:  # one backward (about two forwards) and a second forward
        total += 3.0
    return total

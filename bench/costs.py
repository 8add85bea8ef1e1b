"""Cost of each piece of evidence in forward-equivalents: time over one plain forward pass of the
same batch, measured in the same process (the machine is noisy; ratios travel, seconds do not)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from models.gate import EvidenceExtractor


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_costs(extractor: EvidenceExtractor, x: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Seconds for a plain forward, forward+conductance and LCR on ``x``, and their ratios.

    Returns ``forward_s``, ``conductance_s`` (forward included), ``lcr_s`` (mutants only) and the
    same divided by ``forward_s`` as ``*_fe``.
    """
    x = x.to(extractor.device)

    def forward() -> object:
        with torch.no_grad():
            return extractor.model(x)

    out = {"forward_s": median_seconds(forward, repeats)}
    out["conductance_s"] = median_seconds(lambda: extractor(x, conductance=True, lcr=False), repeats)
    if extractor.ensemble is not None:
        ensemble = extractor.ensemble
        out["lcr_s"] = median_seconds(lambda: ensemble.predict(x), max(1, repeats // 2))
    for key in list(out):
        out[key.replace("_s", "_fe")] = out[key] / out["forward_s"]
    return out


def signal_set_cost(signals: tuple[str, ...] | list[str], costs: dict[str, float]) -> float:
    """Forward-equivalents per image to reach a verdict with ``signals`` (detectors are negligible)."""
    total = costs["conductance_fe"] if "cond" in signals else 1.0
    if "lcr" in signals:
        total += costs.get("lcr_fe", float("nan"))
    return total

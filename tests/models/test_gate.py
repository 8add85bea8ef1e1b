"""The gate's plan (signal set and operating point resolved once) and its output type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.bundle import load_bundle
from models.errors import ConfigError
from models.gate import Gate, load_gate


@pytest.fixture(scope="module")
def gate(tiny_bundle: Path) -> Gate:
    return load_gate(load_bundle(tiny_bundle), "cpu")


def test_plans_resolve_names_once_and_compare_by_name(gate: Gate) -> None:
    plan = gate.plan()
    assert plan.signal_set is gate.signal_set(None) and plan.set_name == gate.default_set
    assert plan.point is plan.signal_set.point(None)
    again = gate.plan(gate.default_set, plan.point_name)
    assert again == plan and hash(again) == hash(plan) and {plan: 1}[again] == 1
    assert gate.plan(full_evidence=True) != plan
    with pytest.raises(ConfigError, match="unknown signal set"):
        gate.plan("nope")
    with pytest.raises(ConfigError, match="unknown operating point"):
        gate.plan(None, "nope")


def test_run_with_a_plan_equals_run_with_names(gate: Gate, tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    x = bundle.normalisation.apply(np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8))
    for name in gate.signal_sets:
        by_name = gate.run(x, signal_set=name, full_evidence=True)
        by_plan = gate.run(x, plan=gate.plan(name, full_evidence=True))
        np.testing.assert_array_equal(by_plan.unified_score, by_name.unified_score)
        assert len(by_plan) == 8 and by_plan.signal_set == name
        assert [by_plan.verdict(i) for i in range(8)] == [
            "unknown" if r else "accept" for r in by_name.reject
        ]

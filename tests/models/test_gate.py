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


def test_a_plan_computes_only_what_its_set_reads_and_decides_at_its_point(
    gate: Gate, tiny_bundle: Path
) -> None:
    bundle = load_bundle(tiny_bundle)
    c, h, w = bundle.input_shape
    pixels = np.random.default_rng(0).integers(0, 256, (8, h, w, c), dtype=np.uint8)
    x = bundle.normalisation.apply(pixels)
    full = gate.run(x, plan=gate.plan(full_evidence=True))
    assert full.conductance is not None and full.lcr is not None
    for name, chosen in gate.signal_sets.items():
        for point_name, point in chosen.operating_points.items():
            out = gate.run(x, plan=gate.plan(name, point_name))
            assert out.signal_set == name and out.operating_point is point and len(out) == 8
            assert (out.lcr is not None) == ("lcr" in chosen.signals)
            assert (out.conductance is not None) == ("cond" in chosen.signals)
            np.testing.assert_array_equal(out.reject, out.unified_score > point.threshold)
            assert [out.verdict(i) for i in range(8)] == ["unknown" if r else "accept" for r in out.reject]
            np.testing.assert_array_equal(out.prediction, full.prediction)
            if out.lcr is not None:
                np.testing.assert_array_equal(out.lcr, full.lcr)

"""``bench.cascade`` on the tiny bundle: cascading a bundle onto itself at the same point changes
nothing; at a looser point the system accepts exactly what the looser gate accepts, and every figure
equals the one computed here from the stored test scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.cascade import SIDES, _answers, _bootstrap, _figures, _verdicts, main
from models.bundle import SCORES_FILE, load_bundle, scores_key


def test_a_bundle_cascaded_onto_itself_at_the_same_point_changes_nothing(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    side = _verdicts(bundle, None, None)
    answers = _answers(side, side)
    figures = {name: _figures(answers[name]["accepted"], answers[name]["correct"]) for name in SIDES}
    assert figures["system"] == figures["primary"] == figures["cascade"]
    assert not answers["system"]["by_cascade"].any()
    assert all(ci == [0.0, 0.0] for ci in _bootstrap(answers, 50, seed=0).values())


def test_a_looser_cascade_point_is_measured_on_the_stored_verdicts(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.detectors is not None
    info = bundle.detectors.signal_set(None)
    strict = min(info.operating_points, key=lambda p: info.operating_points[p]["threshold"])
    loose = max(info.operating_points, key=lambda p: info.operating_points[p]["threshold"])
    out = tmp_path / "cascade.json"
    args = [
        "--primary",
        str(tiny_bundle),
        "--cascade",
        str(tiny_bundle),
        "--primary-operating-point",
        strict,
        "--cascade-operating-point",
        loose,
        "--n-boot",
        "50",
        "--timing-images",
        "8",
        "--batch-size",
        "8",
        "--repeats",
        "1",
        "--parity-images",
        "8",
        "--out",
        str(out),
        "--markdown",
        str(tmp_path / "cascade.md"),
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    scores = bundle.read_arrays(SCORES_FILE)[scores_key(0, info.name, "test")]
    features = bundle.read_features("test")
    correct = features["prediction"] == features["label"]
    accepted = {
        "primary": scores <= info.operating_points[strict]["threshold"],
        "cascade": scores <= info.operating_points[loose]["threshold"],
    }
    accepted["system"] = accepted["primary"] | accepted["cascade"]
    assert np.array_equal(accepted["system"], accepted["cascade"])  # the looser gate accepts a superset
    for side, acc in accepted.items():
        figures = result["figures"][side]
        assert figures["coverage"] == pytest.approx(acc.mean())
        assert figures["selective_accuracy"] == pytest.approx(correct[acc].mean())
        assert figures["overall_accuracy"] == pytest.approx(correct.mean())  # one CNN: the same labels
    share = (accepted["cascade"] & ~accepted["primary"]).mean()
    assert result["figures"]["system"]["decided_by_cascade_share"] == pytest.approx(share)
    low, high = result["ci95_system_minus"]["coverage_vs_primary"]
    assert 0.0 <= low <= share <= high
    assert "(c) cascade system" in (tmp_path / "cascade.md").read_text()
    forward = result["forward_seconds"]["ratio"]
    assert 0 < forward and result["figures"]["system"]["cost_fe"] == pytest.approx(
        result["figures"]["primary"]["cost_fe"]
        + (1 - accepted["primary"].mean()) * result["cascade"]["cost_fe_own"] * forward
    )

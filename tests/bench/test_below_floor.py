"""``bench.below_floor`` on the tiny bundle: each early-stopping row replays the stored labels as
:func:`models.sequential_lcr.simulate_sequential` does, and its AUROC is sklearn's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench.below_floor import main, val_hypotheses
from models.bundle import load_bundle
from models.sequential_lcr import SPRT, simulate_sequential


def test_hypotheses_are_the_class_means_kept_apart() -> None:
    lcr = np.array([0.0, 0.1, 0.2, 0.5, 0.7])
    wrong = np.array([False, False, False, True, True])
    assert val_hypotheses(lcr, wrong, total=100) == pytest.approx((0.1, 0.6))
    # p1 is raised to 2 p0 where the wrong predictions' mean is closer than that
    assert val_hypotheses(np.array([0.2, 0.2, 0.3]), np.array([False, False, True]), 100) == pytest.approx(
        (0.2, 0.4)
    )


def test_stored_feature_rows_replay_and_score_like_sklearn(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "below.json"
    assert main(["--bundle", str(tiny_bundle), "--no-restricted", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    val = load_bundle(tiny_bundle).read_arrays("features/val.npz")
    wrong = val["prediction"] != val["label"]
    p0, p1 = val_hypotheses(val["lcr"], wrong, len(val["mutant_labels"]))
    rows = {r["setting"]: r for r in result["rows"]}
    name = f"sprt p0={p0:.3f},p1={p1:.3f} a=b=0.01 k=10"
    assert name in rows, sorted(rows)
    lcr, used = simulate_sequential(
        val["mutant_labels"].astype(np.int64), val["prediction"], SPRT(p0, p1, 0.01, 0.01), 10
    )
    assert rows[name]["val_auroc"] == pytest.approx(roc_auc_score(wrong, lcr), abs=1e-12)
    assert rows[name]["mutants_used_val"] == pytest.approx(used.mean())

"""``bench.compare_bundles`` on the tiny bundle: against itself nothing differs; against a copy whose
LCR stops early the LCR sets differ and the figures equal sklearn's on the stored scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench.compare_bundles import compare, main
from models.bundle import load_bundle
from models.metrics import wrong_labels
from offline.stages import detectors_stage, lcr_setting_stage


def test_a_bundle_against_itself_loses_nothing(tiny_bundle: Path, capsys) -> None:
    result = compare(tiny_bundle, tiny_bundle, n_boot=50)
    assert result["rows"] and all(
        r["val_loss"] == 0 and r["test_diff"] == 0 and r["adopt"] for r in result["rows"]
    )
    assert main(["--a", str(tiny_bundle), "--b", str(tiny_bundle), "--n-boot", "20"]) == 0
    assert "| cond+lcr |" in capsys.readouterr().out


@pytest.mark.slow
def test_early_stopping_copy_is_compared_on_the_same_images(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "early"
    shutil.copytree(tiny_bundle, copy)
    bundle = load_bundle(copy)
    for name in ("features:lcr", "detectors", "report"):
        bundle.manifest["stages"].pop(name, None)
    bundle.save()
    lcr_setting_stage(bundle, alpha=0.3, chunk_size=3)
    detectors_stage(bundle, seeds=1, progress=False)
    shutil.copytree(tiny_bundle / "report", copy / "report", dirs_exist_ok=True)
    result = compare(tiny_bundle, copy, n_boot=50)
    rows = {r["signal_set"]: r for r in result["rows"]}
    wrong = wrong_labels(load_bundle(copy).read_arrays("features/val.npz"))
    stored = load_bundle(copy).read_arrays("detectors/scores.npz")
    assert rows["lcr"]["val_auroc_b"] == pytest.approx(roc_auc_score(wrong, stored["0/lcr/val"]), abs=1e-12)
    assert rows["msp"]["val_loss"] == 0
    assert result["lcr_settings"]["b"]["early_stopping"] is not None
    assert np.isfinite(rows["cond+lcr"]["test_diff"])

"""The whole build on generated data: a complete bundle whose stored numbers can be reproduced
independently (sklearn on the stored features; the gate on the raw images)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.bundle import load_bundle
from models.data import load_splits
from models.errors import BundleError
from models.gate import load_gate
from models.metrics import wrong_labels
from models.scores import BASELINE_SCORES
from models.signals import conductance_inputs, signal_matrix


def test_bundle_is_complete(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    stages = bundle.manifest["stages"]
    for stage in (
        "prepare",
        "train",
        "conductance",
        "mutants",
        "features:fit",
        "features:val",
        "features:test",
        "detectors",
        "report",
    ):
        assert stage in stages, stage
    assert bundle.manifest["conductance"]["mode"] == "shortcut"
    assert bundle.manifest["mutants"]["count"] == 8
    for name in (
        "report.md",
        "metrics.json",
        "roc.png",
        "risk_coverage.png",
        "lcr_vs_mutants.png",
        "confusion.png",
        "fallback.png",
        "auroc_vs_cost.png",
    ):
        assert (tiny_bundle / "report" / name).is_file(), name
        assert f"report/{name}" in bundle.manifest["files"]


def test_stored_scores_reproduce_from_features_and_report_equals_sklearn(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    gate = load_gate(bundle)
    stored = bundle.read_arrays("detectors/scores.npz")
    metrics = json.loads((tiny_bundle / "report" / "metrics.json").read_text())
    for split in ("val", "test"):
        feats = bundle.read_arrays(f"features/{split}.npz")
        wrong = wrong_labels(feats)
        cond = gate.cond_score(feats["conductance"].astype(np.float64), feats["prediction"])
        np.testing.assert_allclose(cond, stored[f"0/conductance-detector/{split}"], rtol=0, atol=1e-12)
        for name, signal_set in gate.signal_sets.items():
            x = signal_matrix(signal_set.signals, feats["logits"], cond, feats["lcr"])
            np.testing.assert_allclose(
                signal_set.classifier.decision_function(x), stored[f"0/{name}/{split}"], atol=1e-12
            )
            assert metrics["methods"][f"set {name}"][split]["auroc"] == pytest.approx(
                roc_auc_score(wrong, stored[f"0/{name}/{split}"]), abs=1e-12
            )
        for baseline in ("msp", "entropy", "margin", "doctor"):
            expected = roc_auc_score(wrong, BASELINE_SCORES[baseline](feats["logits"]))
            assert metrics["methods"][baseline][split]["auroc"] == pytest.approx(expected, abs=1e-12)
        assert metrics["methods"]["lcr (raw)"][split]["auroc"] == pytest.approx(
            roc_auc_score(wrong, feats["lcr"]), abs=1e-12
        )


def test_gate_on_raw_images_equals_offline_features(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    gate = load_gate(bundle)
    arrays = load_splits(bundle)
    feats = bundle.read_arrays("features/val.npz")
    stored = bundle.read_arrays("detectors/scores.npz")
    idx = np.arange(0, 40)
    for batch in (idx[:1], idx[1:8], idx[8:40]):  # the batch size must not change the answer
        out = gate.run(bundle.normalisation.apply(arrays["val"].images[batch]), full_evidence=True)
        np.testing.assert_array_equal(out.prediction, feats["prediction"][batch])
        np.testing.assert_allclose(out.conductance, feats["conductance"][batch], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.lcr, feats["lcr"][batch], atol=1e-7)
        np.testing.assert_allclose(out.cond_score, stored["0/conductance-detector/val"][batch], atol=1e-5)
        np.testing.assert_allclose(out.unified_score, stored[f"0/{gate.default_set}/val"][batch], atol=1e-5)


def test_stored_operating_points_hold_on_val(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    stored = bundle.read_arrays("detectors/scores.npz")
    wrong = wrong_labels(bundle.read_arrays("features/val.npz")).astype(bool)
    for name, info in bundle.manifest["detectors"]["signal_sets"].items():
        scores = stored[f"0/{name}/val"]
        for spec, point in info["operating_points"].items():
            rejected = scores > point["threshold"]
            assert point["correct_recall"] == pytest.approx((~rejected & ~wrong).sum() / (~wrong).sum())
            assert point["wrong_recall"] == pytest.approx((rejected & wrong).sum() / wrong.sum())
            if spec.startswith("correct-recall="):
                assert point["correct_recall"] >= float(spec.split("=")[1])
            if spec.startswith("wrong-recall="):
                assert point["wrong_recall"] >= float(spec.split("=")[1])


def test_rerunning_a_finished_build_changes_nothing(
    tiny_bundle: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    from models.data import DataSource
    from offline.build import build_bundle
    from offline.profiles import BuildProfile
    from tests.conftest import TINY_PROFILE

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    before = json.loads((copy / "manifest.json").read_text())
    # Every stage is marked done, so nothing is recomputed and no file changes.
    bundle = build_bundle(
        copy, DataSource("fashion-mnist", str(tiny_data_dir)), BuildProfile(**TINY_PROFILE), progress=False
    )
    after = json.loads((copy / "manifest.json").read_text())
    assert before["stages"] == after["stages"]
    assert before["files"] == after["files"]
    load_bundle(bundle.path)
    with pytest.raises(BundleError, match="was started with fit=250, not fit=99"):
        build_bundle(
            copy,
            DataSource("fashion-mnist", str(tiny_data_dir)),
            BuildProfile(**{**TINY_PROFILE, "fit": 99}),
            progress=False,
        )
    # A redone stage may change its own settings, never an earlier stage's.
    with pytest.raises(BundleError, match="epochs=3, not epochs=4"):
        build_bundle(
            copy,
            DataSource("fashion-mnist", str(tiny_data_dir)),
            BuildProfile(**{**TINY_PROFILE, "epochs": 4}),
            redo="detectors",
            progress=False,
        )
    with pytest.raises(BundleError, match="use --redo conductance"):
        build_bundle(
            copy,
            DataSource("fashion-mnist", str(tiny_data_dir)),
            BuildProfile(**TINY_PROFILE),
            layer="layer2",
            redo="mutants",
            progress=False,
        )
    assert json.loads((copy / "manifest.json").read_text())["files"] == before["files"]


def test_mutant_regeneration_is_checked(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["mutants"]["weight_hashes"][3] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="mutant 3"):
        load_gate(load_bundle(copy))


def test_paper_comparison_rows_equal_sklearn_and_the_summary_shows_them(tiny_bundle: Path, capsys) -> None:
    from offline.summary import main as summary_main

    metrics = json.loads((tiny_bundle / "report" / "metrics.json").read_text())
    feats = load_bundle(tiny_bundle).read_arrays("features/test.npz")
    wrong = wrong_labels(feats)
    rows = {r["method"]: r for r in metrics["paper_comparison"]}
    assert {"msp", "entropy", "margin", "doctor", "conductance", "lcr (raw)"} <= set(rows)
    msp_auroc = roc_auc_score(wrong, BASELINE_SCORES["msp"](feats["logits"]))
    for name in ("msp", "doctor", "lcr (raw)"):
        r = rows[name]
        score = feats["lcr"] if name == "lcr (raw)" else BASELINE_SCORES[name](feats["logits"])
        assert r["test_auroc"] == pytest.approx(roc_auc_score(wrong, score), abs=1e-12)
        assert r["diff_to_msp"] == pytest.approx(r["test_auroc"] - msp_auroc, abs=1e-12)
        assert r["test_ci"][0] <= r["test_auroc"] <= r["test_ci"][1]
    assert rows["msp"]["ci_diff_to_msp"] == [0.0, 0.0]
    assert summary_main([f"a={tiny_bundle}", f"b={tiny_bundle}"]) == 0
    out = capsys.readouterr().out
    assert "a: test AUROC [95% CI]" in out and "b: diff to MSP [95% CI]" in out
    assert f"{rows['doctor']['test_auroc']:.4f}" in out


@pytest.mark.slow
def test_conductance_detector_with_the_predicted_class(
    tiny_bundle: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """``--redo detectors --cond-inputs conductance+class``: the detector reads C + K inputs, the
    manifest and report say so, and the gate computes the scores the stage stored."""
    from models.data import DataSource
    from offline.build import build_bundle
    from offline.profiles import BuildProfile
    from tests.conftest import TINY_PROFILE

    copy = tmp_path / "with-class"
    before = load_bundle(tiny_bundle).read_arrays("features/val.npz")
    profile = BuildProfile(**{**TINY_PROFILE, "cond_inputs": "conductance+class"})
    source = DataSource("fashion-mnist", str(tiny_data_dir))
    build_bundle(copy, source, profile, redo="detectors", base=tiny_bundle, progress=False)
    bundle = load_bundle(copy)
    original = load_bundle(tiny_bundle)
    assert bundle.manifest["derived_from"] == original.manifest["bundle_id"]
    assert bundle.manifest["bundle_id"].startswith("with-class-")
    assert original.manifest["detectors"]["conductance"]["inputs"] == "conductance"  # the base is untouched
    with pytest.raises(BundleError, match="was not copied from"):
        build_bundle(tmp_path / "with-class", source, profile, base=tmp_path / "with-class", progress=False)
    assert bundle.manifest["detectors"]["conductance"]["inputs"] == "conductance+class"
    assert bundle.manifest["profile"]["cond_inputs"] == "conductance+class"
    assert "conductance and the predicted class" in (copy / "report" / "report.md").read_text()
    feats = bundle.read_arrays("features/val.npz")
    np.testing.assert_array_equal(feats["conductance"], before["conductance"])  # features were not redone
    gate = load_gate(bundle)
    n_channels, n_classes = feats["conductance"].shape[1], len(bundle.class_names)
    assert gate.cond_inputs == "conductance+class"
    assert gate.cond_detector.n_features_in_ == n_channels + n_classes
    stored = bundle.read_arrays("detectors/scores.npz")
    x = conductance_inputs(feats["conductance"], feats["prediction"], "conductance+class", n_classes)
    np.testing.assert_allclose(
        gate.cond_detector.decision_function(x), stored["0/conductance-detector/val"], atol=1e-12
    )
    out = gate.run(bundle.normalisation.apply(load_splits(bundle)["val"].images[:20]), full_evidence=True)
    np.testing.assert_allclose(out.cond_score, stored["0/conductance-detector/val"][:20], atol=1e-5)
    np.testing.assert_allclose(out.unified_score, stored[f"0/{gate.default_set}/val"][:20], atol=1e-5)
    # The class columns matter: the same conductance with another predicted class scores differently.
    shifted = gate.cond_score(feats["conductance"][:20], (feats["prediction"][:20] + 1) % n_classes)
    assert not np.allclose(shifted, stored["0/conductance-detector/val"][:20])

    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["detectors"]["conductance"]["inputs"] = "conductance+logits"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="detectors.conductance.inputs"):
        load_gate(load_bundle(copy))


def test_seeds_above_msp_are_counted_against_msp_on_every_detector_seed(tiny_bundle: Path) -> None:
    """A gain over MSP is claimed only when it holds across seeds, so the report counts them itself."""
    from models.metrics import paired_bootstrap_auroc

    bundle = load_bundle(tiny_bundle)
    metrics = json.loads((tiny_bundle / "report" / "metrics.json").read_text())
    feats = bundle.read_arrays("features/test.npz")
    wrong = wrong_labels(feats)
    msp = BASELINE_SCORES["msp"](feats["logits"])
    stored = bundle.read_arrays("detectors/scores.npz")
    seeds = bundle.manifest["detectors"]["seeds"]
    n_boot = bundle.manifest["profile"]["n_boot"]
    for row in metrics["evidence_value"]:
        above = sum(
            paired_bootstrap_auroc(
                stored[f"{s}/{row['signal_set']}/test"], msp, wrong, n_boot=n_boot, seed=s
            )["ci_diff"][0]
            > 0
            for s in seeds
        )
        assert row["seeds_ci_above_0_msp"] == f"{above}/{len(seeds)}"
        seed0 = stored[f"0/{row['signal_set']}/test"]
        assert row["test_auroc"] == pytest.approx(roc_auc_score(wrong, seed0), abs=1e-12)
        assert row["diff_to_msp"] == pytest.approx(
            roc_auc_score(wrong, seed0) - roc_auc_score(wrong, msp), abs=1e-12
        )
        assert row["ci_diff_msp"][0] <= row["diff_to_msp"] <= row["ci_diff_msp"][1]
    assert "seeds with CI > 0 vs MSP" in (tiny_bundle / "report" / "report.md").read_text()


@pytest.mark.slow  # a second open-world run on the tiny bundle
def test_profile_default_set_from_the_open_world(
    tiny_bundle: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A profile whose default is an open-world set (VARIANT/SET) builds a bundle that serves it: the
    set is fitted after the detectors, stored for every seed, the report's headline names it, and a
    rerun of the finished build changes nothing."""
    from models.data import DataSource
    from offline.build import DEFAULT_SET_STAGE, build_bundle
    from offline.profiles import BuildProfile
    from tests.conftest import TINY_PROFILE

    copy = tmp_path / "ow-default"
    profile = BuildProfile(**{**TINY_PROFILE, "default_set": "clean/feat+softmax"})
    source = DataSource("fashion-mnist", str(tiny_data_dir))
    build_bundle(copy, source, profile, redo="detectors", base=tiny_bundle, progress=False)
    bundle = load_bundle(copy)
    detectors = bundle.manifest["detectors"]
    assert detectors["default_set"] == "feat+softmax"
    assert bundle.stage_done(DEFAULT_SET_STAGE)
    assert "Default signal set `feat+softmax`" in (copy / "report" / "report.md").read_text()
    stored = bundle.read_arrays("detectors/scores.npz")
    assert all(f"{seed}/feat+softmax/test" in stored for seed in detectors["seeds"])
    gate = load_gate(bundle)
    val = load_splits(bundle)["val"].images[:25]
    out = gate.run(bundle.normalisation.apply(val))
    assert out.signal_set == "feat+softmax"
    np.testing.assert_allclose(out.unified_score, stored["0/feat+softmax/val"][:25], rtol=1e-5, atol=1e-6)
    before = (copy / "manifest.json").read_text()
    build_bundle(copy, source, profile, base=tiny_bundle, progress=False)
    assert (copy / "manifest.json").read_text() == before


def test_a_changed_default_set_is_applied_to_a_finished_bundle(
    tiny_bundle: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A bundle built with one default and rebuilt with a profile naming another (as after the quick
    profile's default changed) serves the new one, with a new report, and keeps its features."""
    from models.data import DataSource
    from offline.build import build_bundle
    from offline.profiles import BuildProfile
    from tests.conftest import TINY_PROFILE

    copy = tmp_path / "changed"
    shutil.copytree(tiny_bundle, copy)
    features_before = (copy / "features" / "val.npz").read_bytes()
    source = DataSource("fashion-mnist", str(tiny_data_dir))
    build_bundle(copy, source, BuildProfile(**{**TINY_PROFILE, "default_set": "softmax"}), progress=False)
    bundle = load_bundle(copy)
    assert bundle.manifest["detectors"]["default_set"] == "softmax"
    assert "Default signal set `softmax`" in (copy / "report" / "report.md").read_text()
    assert (copy / "features" / "val.npz").read_bytes() == features_before
    with pytest.raises(Exception, match="not in the bundle"):
        build_bundle(
            copy, source, BuildProfile(**{**TINY_PROFILE, "default_set": "nonesuch"}), progress=False
        )

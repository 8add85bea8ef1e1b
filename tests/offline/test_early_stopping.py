"""Early-stopping LCR as a bundle setting: the detectors learn from the sequential test replayed on
stored labels, and the gate computes the same LCR live (with plain and with prefix-sharing mutants)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.bundle import load_bundle
from models.data import load_splits
from models.errors import BundleError, ConfigError
from models.gate import load_gate
from models.metrics import wrong_labels
from models.sequential_lcr import SPRT, EarlyStopping, rule_to_dict, simulate_sequential, sprt_from_data
from offline.stages import detectors_stage, lcr_setting_stage, mutants_stage


def _early_stopping_bundle(tiny_bundle: Path, tmp_path: Path, modules: tuple[str, ...] | None) -> Path:
    copy = tmp_path / "early"
    shutil.copytree(tiny_bundle, copy)
    later = ("mutants", "features", "detectors", "report") if modules else ("features", "detectors", "report")
    bundle = load_bundle(copy)
    if modules:
        for name in list(bundle.manifest["stages"]):
            if name.split(":")[0] in later:
                del bundle.manifest["stages"][name]
        bundle.save()
        arrays = load_splits(bundle)
        mutants_stage(
            bundle, arrays, operator="NAI", rate=0.005, n_mutants=8, modules=modules, progress=False
        )
        from offline.stages import features_stage

        features_stage(bundle, arrays, early_stopping_alpha=0.3, early_stopping_chunk=3, progress=False)
    else:
        for name in ("features:lcr", "detectors", "report"):
            bundle.manifest["stages"].pop(name, None)
        bundle.save()
        lcr_setting_stage(bundle, alpha=0.3, chunk_size=3)
    detectors_stage(bundle, seeds=1, progress=False)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("modules", [None, ("layer3",)], ids=["all-layers", "layer3-prefix"])
def test_gate_computes_the_lcr_the_detectors_learnt_from(tiny_bundle: Path, tmp_path: Path, modules) -> None:
    path = _early_stopping_bundle(tiny_bundle, tmp_path, modules)
    bundle = load_bundle(path)
    setting = bundle.manifest["lcr"]["early_stopping"]
    assert setting["chunk_size"] == 3 and setting["rule"]["rule"] == "sprt"
    feats = bundle.read_arrays("features/val.npz")
    # The stored LCR is the replay of the stored rule on the stored labels (an independent call).
    rule = SPRT(**{k: v for k, v in setting["rule"].items() if k != "rule"})
    lcr, used = simulate_sequential(feats["mutant_labels"].astype(np.int64), feats["prediction"], rule, 3)
    np.testing.assert_allclose(feats["lcr"], lcr, atol=1e-7)
    np.testing.assert_array_equal(feats["mutants_used"], used)
    assert used.min() >= 3 and used.max() <= 8
    assert used.mean() < 8, f"nothing stopped early ({setting}): the test would not tell the paths apart"
    full = (feats["mutant_labels"] != feats["prediction"][None]).mean(0)
    np.testing.assert_allclose(feats["lcr_full"], full, atol=1e-7)

    gate = load_gate(bundle)
    arrays = load_splits(bundle)
    stored = bundle.read_arrays("detectors/scores.npz")
    idx = np.arange(40)
    for batch in (idx[:1], idx[1:9], idx[9:40]):
        out = gate.run(bundle.normalisation.apply(arrays["val"].images[batch]), full_evidence=True)
        np.testing.assert_allclose(out.lcr, feats["lcr"][batch], atol=1e-6)
        np.testing.assert_array_equal(out.mutants_used, feats["mutants_used"][batch])
        np.testing.assert_allclose(out.unified_score, stored[f"0/{gate.default_set}/val"][batch], atol=1e-5)


def test_sprt_hypotheses_are_the_fit_split_means() -> None:
    lcr = np.array([0.0, 0.1, 0.2, 0.5, 0.7])
    wrong = np.array([0, 0, 0, 1, 1])
    rule = sprt_from_data(lcr, wrong, alpha=0.02)
    assert rule.p0 == pytest.approx(0.1) and rule.p1 == pytest.approx(0.6)
    assert rule.alpha == rule.beta == 0.02
    with pytest.raises(ConfigError, match="not above"):
        sprt_from_data(lcr, 1 - wrong)
    with pytest.raises(ConfigError, match="both"):
        sprt_from_data(lcr, np.zeros(5))
    # An all-zero LCR among correct predictions is floored, not a degenerate p0 = 0.
    assert sprt_from_data(np.array([0.0, 0.0, 0.4]), np.array([0, 0, 1])).p0 == pytest.approx(1e-3)


def test_setting_round_trips_and_bad_settings_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    setting = EarlyStopping(SPRT(0.05, 0.3, 0.01, 0.01), chunk_size=5, min_mutants=10)
    assert EarlyStopping.from_dict(setting.to_dict()) == setting
    with pytest.raises(ConfigError):
        EarlyStopping.from_dict({"rule": {"rule": "sprt", "p0": 0.5, "p1": 0.1}, "chunk_size": 5})
    with pytest.raises(ConfigError):
        EarlyStopping(SPRT(0.05, 0.3), chunk_size=0)
    copy = tmp_path / "bad"
    shutil.copytree(tiny_bundle, copy)
    bundle = load_bundle(copy)
    bundle.set("lcr", {"early_stopping": {"rule": rule_to_dict(SPRT(0.05, 0.3)), "chunk_size": -1}})
    bundle.save()
    with pytest.raises(BundleError, match="lcr.early_stopping"):
        load_gate(load_bundle(copy))


def test_without_early_stopping_the_lcr_is_the_full_share(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest["lcr"]["early_stopping"] is None
    for split in ("fit", "val", "test"):
        feats = bundle.read_arrays(f"features/{split}.npz")
        np.testing.assert_array_equal(feats["lcr"], feats["lcr_full"])
        assert (feats["mutants_used"] == len(feats["mutant_labels"])).all()
        assert wrong_labels(feats).any()


@pytest.mark.slow
def test_onnx_backend_stops_early_like_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from models.onnx_backend import OnnxMutantEnsemble

    path = _early_stopping_bundle(tiny_bundle, tmp_path, None)
    bundle = load_bundle(path)
    torch_gate, onnx_gate = load_gate(bundle), load_gate(bundle, backend="onnx")
    # The chunks the server runs are exported at load; the all-mutant graphs only if used (offline).
    assert all(len(c._sessions._sessions) == 1 for c in onnx_gate.extractor._sequential.chunks)
    assert len(onnx_gate.extractor.ensemble._sessions._sessions) == 0
    x = bundle.normalisation.apply(load_splits(bundle)["val"].images[:40])
    expected, got = torch_gate.run(x, full_evidence=True), onnx_gate.run(x, full_evidence=True)
    np.testing.assert_array_equal(got.mutants_used, expected.mutants_used)
    np.testing.assert_allclose(got.lcr, expected.lcr, atol=1e-6)
    np.testing.assert_allclose(got.unified_score, expected.unified_score, atol=1e-4)
    # ORT's float rounding moves scores by ~1e-6: verdicts may differ only for scores at the threshold.
    clear = np.abs(expected.unified_score - expected.operating_point.threshold) > 1e-4
    np.testing.assert_array_equal(got.reject[clear], expected.reject[clear])
    chunks = onnx_gate.extractor._sequential.chunks
    assert chunks and all(isinstance(c, OnnxMutantEnsemble) for c in chunks)


@pytest.mark.slow
def test_bench_gate_times_the_early_stopped_lcr_of_confined_mutants(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from bench.gate import load_subject, stage_factories

    path = _early_stopping_bundle(tiny_bundle, tmp_path, ("layer3",))
    subject = load_subject(path)
    x = load_bundle(path).normalisation.apply(load_splits(load_bundle(path))["val"].images[:5])
    factories = stage_factories(subject, x)
    assert "lcr_sequential" in factories and "lcr_auto" in factories and "lcr_vmap" not in factories
    lcr, used = factories["lcr_sequential"]()()
    expected = subject.gate.run(x, full_evidence=True)
    np.testing.assert_allclose(lcr.numpy(), expected.lcr, atol=1e-6)
    np.testing.assert_array_equal(used.numpy(), expected.mutants_used)
    assert factories["lcr_auto"]()().shape == (8, 5)

"""predgate attack (resumable, seeded) and predgate robustness on the tiny bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchattacks
from sklearn.metrics import roc_auc_score

from cli.main import main
from models.attacks import AttackSpec
from models.bundle import SCORES_FILE, adversarial_chunk_file, load_bundle, scores_key
from models.data import load_splits
from models.errors import ConfigError
from offline.attack import load_adversarial, run_attack
from offline.robustness_report import measured_tags as robustness_tags
from offline.robustness_report import robustness_report, write_markdown


@pytest.fixture()
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    return out


def test_attack_job_success_rate_matches_direct_torchattacks(bundle_copy: Path) -> None:
    assert (
        main(
            [
                "attack",
                "--bundle",
                str(bundle_copy),
                "--attack",
                "fgsm",
                "--eps",
                "0.1",
                "--images",
                "60",
                "--chunk-size",
                "25",
            ]
        )
        == 0
    )
    bundle = load_bundle(bundle_copy)
    summary = bundle.manifest["adversarial"]["fgsm-eps0.1"]
    test = load_splits(bundle)["test"]
    model = bundle.load_model("cpu").eval()
    attack = torchattacks.FGSM(model, eps=0.1)
    attack.set_normalization_used(mean=list(bundle.normalisation.mean), std=list(bundle.normalisation.std))
    x = bundle.normalisation.apply(test.images[:60])
    y = torch.as_tensor(test.labels[:60])
    adv = attack.inverse_normalize(attack(x, y))
    adv_u8 = (adv.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        clean = model(x).argmax(1).numpy()
        fooled = model(bundle.normalisation.apply(adv_u8)).argmax(1).numpy()
    correct = clean == test.labels[:60]
    expected = float((correct & (fooled != test.labels[:60])).sum() / correct.sum())
    assert summary["images"] == 60 and summary["clean_correct"] == int(correct.sum())
    assert abs(summary["success_rate"] - expected) <= 1 / correct.sum()
    assert summary["success_rate"] > 0.2  # FGSM at 0.1 does fool this CNN


def test_resume_gives_the_same_images(bundle_copy: Path) -> None:
    spec = AttackSpec("pgd-linf", eps=0.1, steps=3)
    bundle = load_bundle(bundle_copy)
    first = run_attack(bundle, spec, images=40, chunk_size=20, seed=5, progress=False)
    full = load_adversarial(bundle, spec.tag)
    # drop the second chunk: the rerun recomputes only it, with the same seed, so the same images
    # (an interrupted run: that chunk was never written nor recorded)
    (bundle.path / adversarial_chunk_file(spec.tag, 1)).unlink()
    del bundle.manifest["files"][adversarial_chunk_file(spec.tag, 1)]
    bundle.save()
    again = run_attack(load_bundle(bundle_copy), spec, images=40, chunk_size=20, seed=5, progress=False)
    redone = load_adversarial(load_bundle(bundle_copy), spec.tag)
    assert np.array_equal(full["pixels"], redone["pixels"])
    assert first["success_rate"] == again["success_rate"]
    with pytest.raises(Exception, match="made with"):
        run_attack(load_bundle(bundle_copy), spec, images=40, chunk_size=10, seed=5, progress=False)


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()


def test_robustness_report(bundle_copy: Path) -> None:
    assert (
        main(
            [
                "attack",
                "--bundle",
                str(bundle_copy),
                "--attack",
                "pgd-linf",
                "--eps",
                "0.2",
                "--steps",
                "5",
                "--images",
                "80",
            ]
        )
        == 0
    )
    assert main(["robustness", "--bundle", str(bundle_copy), "--n-boot", "50"]) == 0
    report = bundle_copy / "report"
    result = json.loads((report / "robustness.json").read_text())
    r = result["attacks"]["pgd-linf-eps0.2-steps5-alpha0.1"]
    assert r["successful"] > 0 and (report / "robustness.png").stat().st_size > 0
    text = (report / "robustness.md").read_text()
    assert "msp" in text and "Difference to DOCTOR" in text and "DOCTOR, same coverage" in text
    # MSP and DOCTOR recomputed by hand from the stored evidence (numpy softmax, sklearn AUROC)
    bundle = load_bundle(bundle_copy)
    ev = bundle.read_arrays("adversarial/pgd-linf-eps0.2-steps5-alpha0.1/evidence.npz")
    clean = bundle.read_arrays("features/test.npz")
    idx = ev["index"]
    cc = clean["prediction"][idx] == ev["label"]
    fooled = cc & (ev["prediction"] != ev["label"])
    p_clean, p_adv = _softmax(clean["logits"][idx]), _softmax(ev["logits"])
    target = np.r_[np.zeros(cc.sum()), np.ones(fooled.sum())]
    msp_wang = np.r_[-p_clean.max(1)[cc], -p_adv.max(1)[fooled]]
    gini_wang = np.r_[1 - (p_clean**2).sum(1)[cc], 1 - (p_adv**2).sum(1)[fooled]]
    assert r["sets"]["msp"]["adv_vs_clean"]["auroc"] == pytest.approx(
        roc_auc_score(target, msp_wang), abs=1e-9
    )
    assert r["baselines"]["adv_vs_clean"]["doctor"] == pytest.approx(
        roc_auc_score(target, gini_wang), abs=1e-9
    )
    cmp = r["sets"]["cond+lcr"]["adv_vs_clean"]["vs_doctor"]
    assert cmp["auroc_b"] == pytest.approx(roc_auc_score(target, gini_wang), abs=1e-9)
    # at equal coverage: MSP accepting as many rows of the mix as the set, its most confident ones
    point = r["sets"]["cond+lcr"]["operating_points"]["equal-recall"]
    wrong_mix = np.r_[clean["prediction"][idx] != ev["label"], ev["prediction"] != ev["label"]]
    n_acc = round(point["accepted_mix"] * len(wrong_mix))
    confident = np.argsort(np.r_[-p_clean.max(1), -p_adv.max(1)], kind="stable")[:n_acc]
    assert point["same_coverage"]["msp"]["accuracy_b"] == pytest.approx(1 - wrong_mix[confident].mean())
    assert point["same_coverage"]["msp"]["accuracy_a"] == pytest.approx(point["accuracy_accepted_mix"])


def test_attack_on_the_fit_split_is_stored_apart_and_labelled_from_fit(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    summary = run_attack(bundle, AttackSpec("fgsm", eps=0.1), split="fit", images=30, progress=False)
    assert (
        "fit-fgsm-eps0.1" in bundle.manifest["adversarial"]
        and "fgsm-eps0.1" not in bundle.manifest["adversarial"]
    )
    fit = load_splits(bundle)["fit"]
    table = load_adversarial(bundle, "fit-fgsm-eps0.1", 30)
    assert np.array_equal(table["index"], np.arange(30))
    correct = table["clean_prediction"] == fit.labels[:30]
    assert summary["clean_correct"] == int(correct.sum())
    # a fit-split attack is not measured by the report
    assert robustness_tags(load_bundle(bundle_copy)) == []


def test_detectors_fitted_with_adversarial_rows(bundle_copy: Path) -> None:
    """The exposure study: FGSM rows on fit and val, measured on FGSM (seen) and PGD (unseen) test
    attacks; the clean variant reproduces the bundle's own detectors, and the figures match sklearn."""
    for split in ("fit", "val", "test"):
        args = ["attack", "--bundle", str(bundle_copy), "--attack", "fgsm", "--eps", "0.15", "--split", split]
        assert main([*args, "--images", "100"]) == 0
    pgd = ["attack", "--bundle", str(bundle_copy), "--attack", "pgd-l2", "--eps", "1.0", "--steps", "5"]
    assert main([*pgd, "--images", "80"]) == 0
    args = ["robustness", "--bundle", str(bundle_copy), "--n-boot", "50", "--adv-exposure", "fgsm-eps0.15"]
    assert main(args) == 0
    result = json.loads((bundle_copy / "report" / "robustness.json").read_text())
    study = result["adv_exposure"]
    assert study["rows"]["fit"]["images"] == 100 and study["rows"]["fit"]["wrong"] > 0
    assert study["attacks"]["fgsm-eps0.15"]["relation"] == "seen"
    assert study["attacks"]["pgd-l2-eps1-steps5-alpha0.5"]["relation"] == "unseen"
    assert "Detectors fitted with adversarial rows" in (bundle_copy / "report" / "robustness.md").read_text()
    # refit here, the clean variant is the build's detector: its clean-test AUROC is the stored set's
    bundle = load_bundle(bundle_copy)
    test = bundle.read_arrays("features/test.npz")
    wrong = test["prediction"] != test["label"]
    stored = bundle.read_arrays(SCORES_FILE)
    seeds = study["seeds"]
    for name in ("cond+lcr", "msp"):
        expected = np.mean([roc_auc_score(wrong, stored[scores_key(s, name, "test")]) for s in range(seeds)])
        assert study["clean_test"][name]["auroc"]["clean"] == pytest.approx(expected, abs=1e-9)
    row = study["attacks"]["pgd-l2-eps1-steps5-alpha0.5"]["sets"]["cond+lcr"]["wrong_vs_correct"]
    assert row["adv_minus_msp"]["seeds"] == seeds and 0 <= row["adv_minus_clean"]["seeds_above"] <= seeds
    # the MSP column by hand on the clean + adversarial mix
    ev = bundle.read_arrays("adversarial/pgd-l2-eps1-steps5-alpha0.5/evidence.npz")
    idx = ev["index"]
    mix_wrong = np.r_[test["prediction"][idx] != ev["label"], ev["prediction"] != ev["label"]]
    msp_mix = np.r_[-_softmax(test["logits"][idx]).max(1), -_softmax(ev["logits"]).max(1)]
    assert row["msp"] == pytest.approx(roc_auc_score(mix_wrong, msp_mix), abs=1e-9)


def test_exposure_needs_the_fit_and_val_attacks(bundle_copy: Path) -> None:
    assert main(["attack", "--bundle", str(bundle_copy), "--attack", "fgsm", "--images", "20"]) == 0
    with pytest.raises(ConfigError, match="--split fit"):
        robustness_report(load_bundle(bundle_copy), n_boot=10, adv_exposure="fgsm-eps0.1", progress=False)


def test_robustness_markdown_names_a_point_that_one_set_lacks(tmp_path: Path) -> None:
    """A set may lack an operating point (a risk target its val scores cannot reach): the table says so."""
    cmp = {
        "auroc_a": 0.6,
        "auroc_b": 0.6,
        "diff": 0.0,
        "ci_a": [0.5, 0.7],
        "ci_b": [0.5, 0.7],
        "ci_diff": [-0.1, 0.1],
    }
    ci = {"auroc": 0.6, "vs_msp": cmp, "vs_doctor": cmp}
    same = {"accuracy_a": 0.8, "accuracy_b": 0.7, "diff": 0.1, "ci_diff": [0.05, 0.15], "n_boot": 10}
    point = {
        "reject_successful_adv": 0.5,
        "reject_clean_correct": 0.1,
        "accuracy_accepted_mix": 0.8,
        "accepted_mix": 0.6,
        "same_coverage": {"msp": same, "doctor": same},
    }
    result = {
        "bundle_id": "b",
        "n_boot": 10,
        "attacks": {
            "fgsm-eps0.1": {
                "images": 10,
                "clean_correct": 9,
                "success_rate": 0.5,
                "adv_accuracy": 0.4,
                "mean_lcr_clean_correct": None,
                "mean_lcr_successful": None,
                "raw_lcr_auroc": None,
                "baselines": {"adv_vs_clean": {"msp": 0.6, "doctor": 0.61}, "wrong_vs_correct": {}},
                "sets": {
                    "msp": {
                        "adv_vs_clean": ci,
                        "wrong_vs_correct": ci,
                        "operating_points": {"equal-recall": point, "risk": point},
                    },
                    "lcr": {
                        "adv_vs_clean": ci,
                        "wrong_vs_correct": ci,
                        "operating_points": {"equal-recall": point},
                    },
                },
            }
        },
    }
    write_markdown(result, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "### risk" in text and "| fgsm-eps0.1 | lcr | not stored for this set |" in text
    assert "+0.100 [+0.050, +0.150] **+**" in text  # the equal-coverage CI above 0 is marked


def test_standard_plan_runs_every_attack_and_the_exposure_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--plan standard``: each planned attack on test, the exposure attack on fit, val and test."""
    from offline import robustness_report as job
    from offline.attack_plans import PLANS, plan_for

    calls: list[tuple[str, str, int]] = []

    def fake_run_attack(bundle: object, spec: AttackSpec, *, split: str = "test", images: int, **_: object):
        calls.append((spec.tag, split, images))
        return {"success_rate": 0.5}

    monkeypatch.setattr(job, "run_attack", fake_run_attack)

    from types import SimpleNamespace

    bundle = SimpleNamespace(manifest={"dataset": {"name": "cifar10"}})
    tags, exposure = job.run_plan(bundle, 300, progress=False)  # type: ignore[arg-type]
    plan = PLANS["cifar10"]
    assert exposure == plan.exposure.tag == "pgd-linf-eps0.0156863-steps10-alpha0.00392157"
    assert {t for t, split, _ in calls if split == "test"} == set(tags)
    assert (exposure, "fit", plan.exposure_images) in calls and (
        exposure,
        "val",
        plan.exposure_images,
    ) in calls
    assert ("deepfool-steps50", "test", 200) in calls and ("fgsm-eps0.0313725", "test", 300) in calls
    assert {p.spec.name for p in plan.attacks} == {
        "fgsm",
        "pgd-linf",
        "pgd-l2",
        "cw-l2",
        "deepfool",
        "square",
    }
    assert plan_for("imagefolder") is plan
    with pytest.raises(ConfigError, match="no standard attack plan"):
        plan_for("mnist")

"""predgate attack (resumable, seeded) and predgate robustness on the tiny bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchattacks

from cli.main import main
from models.attacks import AttackSpec
from models.bundle import adversarial_chunk_file, load_bundle
from models.data import load_splits
from models.metrics import auroc
from offline.attack import load_adversarial, run_attack
from offline.robustness_report import write_markdown


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
    assert "msp" in (report / "robustness.md").read_text()
    # the msp set's AUROC, recomputed by hand from the stored evidence with sklearn
    bundle = load_bundle(bundle_copy)
    ev = bundle.read_arrays("adversarial/pgd-linf-eps0.2-steps5-alpha0.1/evidence.npz")
    clean = bundle.read_arrays("features/test.npz")
    idx = ev["index"]
    cc = clean["prediction"][idx] == ev["label"]
    fooled = cc & (ev["prediction"] != ev["label"])

    def msp(logits: np.ndarray) -> np.ndarray:
        return -torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).max(1).values.numpy()

    expected = auroc(
        np.r_[msp(clean["logits"][idx][cc]), msp(ev["logits"][fooled])],
        np.r_[np.zeros(cc.sum()), np.ones(fooled.sum())],
    )
    assert abs(r["sets"]["msp"]["adv_vs_clean"]["auroc_a"] - expected) < 1e-9


def test_robustness_markdown_names_a_point_that_one_set_lacks(tmp_path: Path) -> None:
    """A set may lack an operating point (a risk target its val scores cannot reach): the table says so."""
    ci = {
        "auroc_a": 0.6,
        "auroc_b": 0.6,
        "diff": 0.0,
        "ci_a": [0.5, 0.7],
        "ci_b": [0.5, 0.7],
        "ci_diff": [-0.1, 0.1],
    }
    point = {
        "reject_successful_adv": 0.5,
        "reject_clean_correct": 0.1,
        "accuracy_accepted_mix": 0.8,
        "accepted_mix": 0.6,
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

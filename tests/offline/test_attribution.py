"""predgate attribution on the tiny bundle: its cleanliness and overlap equal captum and numpy called
directly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import Saliency

from cli.main import main
from models.bundle import load_bundle
from models.data import load_splits
from offline.attack import load_adversarial

TAG = "fgsm-eps0.1"


def _cos(m: np.ndarray, x: np.ndarray) -> float:
    m, x = np.abs(m).ravel(), x.astype(np.float64).mean(-1).ravel()
    return float(m @ x / (np.linalg.norm(m) * np.linalg.norm(x)))


def test_attribution_report_matches_captum_called_directly(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle_dir = shutil.copytree(tiny_bundle, tmp_path / "b")
    assert (
        main(["attack", "--bundle", str(bundle_dir), "--attack", "fgsm", "--eps", "0.1", "--images", "40"])
        == 0
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "attribution",
                "--bundle",
                str(bundle_dir),
                "--tag",
                TAG,
                "--images",
                "40",
                "--methods",
                "saliency",
                "grad_cam",
                "--n-boot",
                "50",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "attribution.json").read_text())
    assert {p.name for p in out.iterdir()} >= {
        "attribution.md",
        "attribution-saliency.png",
        "attribution-grad_cam.png",
    }
    (model_result,) = result["models"].values()
    assert model_result["adversarial_training"] is None and model_result["k"] == round(0.1 * 28 * 28)

    bundle = load_bundle(bundle_dir)
    test, adv = load_splits(bundle)["test"], load_adversarial(bundle, TAG, 40)
    model = bundle.load_model("cpu").eval()
    x_clean = bundle.normalisation.apply(test.images[adv["index"]]).requires_grad_(True)
    x_adv = bundle.normalisation.apply(adv["images"]).requires_grad_(True)
    with torch.no_grad():
        pred_clean, pred_adv = model(x_clean).argmax(1), model(x_adv).argmax(1)
    sal_clean = Saliency(model).attribute(x_clean, target=pred_clean, abs=True).detach().amax(1).numpy()
    sal_adv = Saliency(model).attribute(x_adv, target=pred_adv, abs=True).detach().amax(1).numpy()
    clean_images = test.images[adv["index"]]
    want_clean = np.mean([_cos(sal_clean[i], clean_images[i]) for i in range(40)])
    want_adv = np.mean([_cos(sal_adv[i], clean_images[i]) for i in range(40)])
    k = model_result["k"]
    overlap = [
        len(set(np.argsort(-sal_clean[i].ravel())[:k]) & set(np.argsort(-sal_adv[i].ravel())[:k])) / k
        for i in range(40)
    ]
    sal = model_result["methods"]["saliency"]
    assert sal["cleanliness_clean"]["mean"] == pytest.approx(want_clean, abs=1e-6)
    assert sal["cleanliness_adv"]["mean"] == pytest.approx(want_adv, abs=1e-6)
    assert sal["top_k_overlap_all"]["mean"] == pytest.approx(np.mean(overlap), abs=1e-6)
    lo, hi = sal["cleanliness_clean"]["ci"]
    assert lo <= want_clean <= hi
    labels = test.labels[adv["index"]]
    fooled = (pred_clean.numpy() == labels) & (pred_adv.numpy() != labels)
    assert model_result["successful"] == int(fooled.sum())
    if "instability_vs_msp" in sal:
        assert 0.0 <= sal["instability_vs_msp"]["auroc_a"] <= 1.0

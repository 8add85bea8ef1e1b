"""The open-world evaluation end to end on the tiny bundle, its figures checked against sklearn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from cli.main import main
from models.bundle import load_bundle
from models.data import load_splits
from models.errors import ConfigError
from models.gate import load_gate
from models.scores import msp_score
from offline.corruptions import KINDS, corrupt_images, kinds_for
from offline.open_world import adopt, fit_default_set, run_open_world
from offline.open_world_report import regime_table
from offline.open_world_suites import (
    EVAL_KINDS,
    EXPOSURE_KINDS,
    evaluation_suites,
    exposure_rows,
    shuffled_outliers,
)
from offline.unknown_inputs import unknown_sets


def test_corruptions_keep_shape_and_are_seeded() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for kind in kinds_for(1):
        out = corrupt_images(grey, kind, 3, seed=1)
        assert out.shape == grey.shape and out.dtype == np.uint8
        assert np.array_equal(out, corrupt_images(grey, kind, 3, seed=1)), kind
    for kind in ("gaussian_noise", "saturate", "rotation", "contrast"):
        assert corrupt_images(rgb, kind, 5).shape == rgb.shape
    # severity makes noise stronger and contrast lower
    flat = np.full((4, 28, 28, 1), 128, dtype=np.uint8)
    noise = [np.abs(corrupt_images(flat, "gaussian_noise", s).astype(int) - 128).mean() for s in (1, 5)]
    assert noise[1] > noise[0] > 0
    contrast = [corrupt_images(grey, "contrast", s).std() for s in (1, 5)]
    assert contrast[1] < contrast[0] < grey.std()
    assert not set(EVAL_KINDS) & set(EXPOSURE_KINDS)
    assert set(EVAL_KINDS) | set(EXPOSURE_KINDS) == set(KINDS)


def test_unknown_sets_and_exposure_rows(cifar10_npz_dir: Path) -> None:
    sets = unknown_sets(7, (28, 28, 1), dataset="fashion-mnist", data_roots={"cifar10": str(cifar10_npz_dir)})
    assert set(sets) == {"noise-gaussian", "noise-uniform", "constant", "digits", "other-dataset"}
    assert all(v.shape == (7, 28, 28, 1) and v.dtype == np.uint8 for v in sets.values())
    assert all(len(np.unique(img)) == 1 for img in sets["constant"])
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28, 1), dtype=np.uint8)
    shuffled = shuffled_outliers(images, 4, seed=0)
    assert shuffled.shape == (4, 28, 28, 1)
    # permuting pixels keeps each image's histogram
    assert any(np.array_equal(np.sort(shuffled[0].ravel()), np.sort(im.ravel())) for im in images)
    rows, labels = exposure_rows(images, np.arange(10) % 3, n_outliers=3, seed=0)
    assert rows.shape == (13, 28, 28, 1) and list(labels[-3:]) == [-1, -1, -1]


@pytest.mark.slow
def test_open_world_on_the_tiny_bundle(tiny_bundle: Path, tmp_path: Path, cifar10_npz_dir: Path) -> None:
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    bundle = load_bundle(path)
    result = run_open_world(
        bundle,
        images=30,
        kinds=("gaussian_noise", "contrast"),
        severities=(1, 5),
        exposure_images=80,
        seeds=2,
        data_roots={"cifar10": str(cifar10_npz_dir)},
        progress=False,
    )
    assert set(result.suites) >= {"clean", "gaussian_noise-1", "contrast-5", "digits", "mixed"}
    assert all(s["label"].min() == -1 for n, s in result.suites.items() if s["regime"] == "unknown")
    table = regime_table(result, n_boot=30)
    assert {"clean", "shift-s1", "shift-s5", "mixed", "unknown-far"} <= set(table)
    # the figures are sklearn's on the pooled suites
    for regime, names, unknown_only in (
        ("shift-s5", ["gaussian_noise-5", "contrast-5"], False),
        ("unknown-digits", ["clean", "digits"], True),
    ):
        label = np.concatenate([result.suites[n]["label"] for n in names])
        pred = np.concatenate([result.suites[n]["prediction"] for n in names])
        positive = (label < 0) if unknown_only else (label != pred)
        logits = np.concatenate([result.suites[n]["logits"] for n in names])
        assert table[regime]["baselines"]["msp"]["auroc"] == pytest.approx(
            roc_auc_score(positive, msp_score(logits))
        )
        for key in ("clean/cond+lcr", "exposed/maha"):
            scores = np.concatenate(
                [result.scores[n][(*key.split("/")[:1], 0, key.split("/")[1])] for n in names]
            )
            assert table[regime]["sets"][key]["per_seed"][0]["auroc"] == pytest.approx(
                roc_auc_score(positive, scores)
            )
    # a rerun reads the cached evidence and gives the same scores
    again = run_open_world(
        load_bundle(path),
        images=30,
        kinds=("gaussian_noise", "contrast"),
        severities=(1, 5),
        exposure_images=80,
        seeds=2,
        data_roots={"cifar10": str(cifar10_npz_dir)},
        progress=False,
    )
    assert np.array_equal(
        again.scores["contrast-5"][("clean", 0, "msp")], result.scores["contrast-5"][("clean", 0, "msp")]
    )
    # adopted sets are served by the gate with the scores the evaluation computed offline
    names = adopt(
        load_bundle(path),
        again,
        ["exposed/feat+softmax", "clean/everything", "exposed/doctor_pert"],
        default="exposed/feat+softmax",
    )
    assert names == ["feat+softmax-exposed", "everything", "doctor_pert-exposed"]
    served = load_bundle(path)
    assert served.manifest["detectors"]["default_set"] == "feat+softmax-exposed"
    gate = load_gate(served)
    clean = again.suites["clean"]
    test = load_splits(served)["test"]
    pick = np.sort(np.random.default_rng((0, 11)).choice(len(test), 30, replace=False))
    assert np.array_equal(test.labels[pick], clean["label"])
    x = served.normalisation.apply(test.images[pick])
    for name, key in zip(
        names,
        [("exposed", 0, "feat+softmax"), ("clean", 0, "everything"), ("exposed", 0, "doctor_pert")],
        strict=True,
    ):
        out = gate.run(x, signal_set=name)
        assert np.allclose(out.unified_score, again.scores["clean"][key], rtol=1e-5, atol=1e-6), name
    assert gate.run(x).signal_set == "feat+softmax-exposed"
    # an exposed set that reads conductance is served with the exposed variant's conductance detector
    assert adopt(load_bundle(path), again, ["exposed/cond+feat+softmax"]) == ["cond+feat+softmax-exposed"]
    served = load_bundle(path)
    info = served.manifest["detectors"]["signal_sets"]["cond+feat+softmax-exposed"]
    assert info["cond_detector_stem"] == "detectors/conductance-exposed"
    gate = load_gate(served)
    own = gate.run(x, signal_set="cond+feat+softmax-exposed")
    assert np.allclose(
        own.unified_score, again.scores["clean"][("exposed", 0, "cond+feat+softmax")], rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(own.cond_score, gate.run(x, signal_set="cond+lcr").cond_score)
    # other settings on the same bundle are refused, naming what to do
    with pytest.raises(Exception, match="same settings"):
        run_open_world(load_bundle(path), images=31, progress=False)


@pytest.mark.slow
def test_open_world_cli_writes_the_report(tiny_bundle: Path, tmp_path: Path, cifar10_npz_dir: Path) -> None:
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    code = main(
        [
            "open-world",
            "--bundle",
            str(path),
            "--images",
            "20",
            "--kinds",
            "rotation",
            "--severities",
            "3",
            "--exposure-images",
            "60",
            "--seeds",
            "1",
            "--n-boot",
            "20",
            "--cifar10-root",
            str(cifar10_npz_dir),
            "--preview",
            "--adopt",
            "--make-default",
        ]
    )
    assert code == 0
    report = path / "report"
    text = (report / "open_world.md").read_text()
    assert "Best set per regime" in text and "shift-s3" in text and "mixed" in text
    summary = json.loads((report / "open_world.json").read_text())
    chosen = summary["default"]["chosen"]
    assert chosen is not None
    served = load_bundle(path)
    variant, name = chosen.split("/", 1)
    assert served.manifest["detectors"]["default_set"] == (
        name if variant == "clean" else f"{name}-{variant}"
    )
    assert load_gate(served).default_set == served.manifest["detectors"]["default_set"]
    for png in ("open_world_shift.png", "open_world_unknown.png", "open_world_suites.png"):
        assert (report / png).stat().st_size > 1000


def test_fit_default_set_serves_the_named_set(tiny_bundle: Path, tmp_path: Path) -> None:
    """What a build does for a profile whose default is an open-world set: no suites, the set fitted
    on the bundle's own splits (exposure rows without LCR when the set reads none), stored for every
    detector seed, and the gate's scores on test equal to the stored ones."""
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    served_as = fit_default_set(load_bundle(path), "exposed/cond+feat+softmax", exposure_images=60)
    assert served_as == "cond+feat+softmax-exposed"
    served = load_bundle(path)
    detectors = served.manifest["detectors"]
    assert detectors["default_set"] == served_as and "build profile" in detectors["default_chosen_by"]
    assert detectors["signal_sets"][served_as]["cond_detector_stem"] == "detectors/conductance-exposed"
    assert served.has_file("open_world/exposure/fit-no-lcr.npz")
    stored = served.read_arrays("detectors/scores.npz")
    test = load_splits(served)["test"]
    for seed in detectors["seeds"]:
        assert stored[f"{seed}/{served_as}/test"].shape == (len(test),)
    gate = load_gate(served)
    out = gate.run(served.normalisation.apply(test.images))
    assert out.signal_set == served_as
    assert np.allclose(out.unified_score, stored[f"0/{served_as}/test"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="variant"):
        fit_default_set(served, "weird/softmax")


def test_shift_writes_the_suites_open_world_measures(
    tiny_bundle: Path, tmp_path: Path, cifar10_npz_dir: Path
) -> None:
    out = tmp_path / "suites"
    held_out = tmp_path / "held-out" / "boots"  # an image folder: one sub-folder per class
    held_out.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 40 * i, dtype=np.uint8)).save(held_out / f"{i}.png")
    code = main(
        [
            "shift",
            "--bundle",
            str(tiny_bundle),
            "--images",
            "12",
            "--kinds",
            "contrast",
            "rotation",
            "--severities",
            "2",
            "5",
            "--out",
            str(out),
            "--cifar10-root",
            str(cifar10_npz_dir),
            "--held-out-class",
            str(held_out.parent),
        ]
    )
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    names = [s["suite"] for s in index["suites"]]
    assert names[:5] == ["clean", "contrast-2", "contrast-5", "rotation-2", "rotation-5"]
    assert "mixed" in names and "digits" in names
    bundle = load_bundle(tiny_bundle)
    test = load_splits(bundle)["test"]
    expected = evaluation_suites(
        test.images,
        test.labels,
        images=12,
        kinds=("contrast", "rotation"),
        severities=(2, 5),
        dataset="fashion-mnist",
        seed=0,
        data_roots={"cifar10": str(cifar10_npz_dir), "held-out-class": str(held_out.parent)},
    )
    for suite in expected:
        with np.load(out / f"{suite.name}.npz") as stored:
            assert np.array_equal(stored["images"], suite.images) and np.array_equal(
                stored["labels"], suite.labels
            )
    clean = np.load(out / "clean.npz")
    assert not np.array_equal(np.load(out / "contrast-5.npz")["images"], clean["images"])
    assert (np.load(out / "digits.npz")["labels"] == -1).all()
    held = np.load(out / "held-out-class.npz")
    assert held["images"].shape == (4, 28, 28, 1) and (held["labels"] == -1).all()

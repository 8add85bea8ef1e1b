"""``predgate build --from B --redo detectors --reviews DB`` on the tiny bundle: reviews written by the
service's own outbox and review store are read back (PNG and tensor items, a review of another class
list skipped), the served set is refitted in both arms, the base arm reproduces the served detectors,
the refitted set is what the new bundle serves, and its held-out AUROC in the report is the one the
gate's own scores give (sklearn)."""

from __future__ import annotations

import io
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
from models.gate import GateOutput, load_gate
from models.scores import doctor, msp_score
from offline.corruptions import corrupt_images
from offline.open_world import fit_default_set
from offline.review_refit import served_set
from offline.reviews import read_reviews, split_reviews
from service.fallback.outbox import NewItem, Outbox
from service.fallback.reviews import ReviewStore


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(tensor: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tensor.astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def write_reviews(bundle_path: Path, directory: Path, n: int = 80) -> dict[str, int]:
    """An outbox holding ``n`` reviewed items as a server would store them: test images (half of them
    corrupted) predicted by the bundle's gate, every tenth one sent as a tensor, the last one reviewed
    against another class list; noise images reviewed as "none of these". Returns key -> true label."""
    bundle = load_bundle(bundle_path)
    gate = load_gate(bundle)
    test = load_splits(bundle)["test"]
    images = test.images[:n].copy()
    images[n // 2 :] = corrupt_images(images[n // 2 :], "gaussian_noise", 5, seed=1)
    labels = test.labels[:n].copy()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(8, *images.shape[1:]), dtype=np.uint8)
    images, labels = np.concatenate([images, noise]), np.concatenate([labels, np.full(8, -1)])
    x = bundle.normalisation.apply(images)
    predicted = gate.run(x).prediction
    names = bundle.class_names
    items = []
    for i, guess in enumerate(predicted):
        meta = {
            "bundle_id": bundle.manifest["bundle_id"],
            "prediction": {"label": int(guess), "primary_label": int(guess), "class_name": names[int(guess)]},
        }
        if i == len(predicted) - 1:
            meta["prediction"]["class_name"] = "a class of another bundle"
        blob = (_npy(x[i].numpy()), "application/x-npy") if i % 10 == 3 else (_png(images[i]), "image/png")
        items.append(NewItem(meta, *blob))
    outbox = Outbox(directory)
    store = ReviewStore(outbox)
    keys = outbox.enqueue(items)
    for key, label in zip(keys, labels, strict=True):
        store.record(key, None if label < 0 else int(label), "tester", settle=True)
    outbox.close()
    return dict(zip(keys, labels.tolist(), strict=True))


@pytest.fixture(scope="module")
def reviews_dir(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    directory = tmp_path_factory.mktemp("reviews")
    return directory, write_reviews(tiny_bundle, directory)


def test_reviews_are_read_back_as_the_server_stored_them(
    tiny_bundle: Path, reviews_dir: tuple[Path, dict[str, int]]
) -> None:
    directory, truth = reviews_dir
    bundle = load_bundle(tiny_bundle)
    reviewed = read_reviews(directory, bundle)
    assert reviewed.skipped == {"made against another class list": 1}
    assert len(reviewed) == len(truth) - 1
    assert [truth[k] for k in reviewed.keys] == reviewed.labels.tolist()
    # a tensor item comes back as the image it was normalised from (exactly, for uint8 sources)
    test = load_splits(bundle)["test"]
    assert np.array_equal(reviewed.images[3], test.images[3])
    refit, held = split_reviews(reviewed, 0.5, seed=0)
    assert set(refit.keys).isdisjoint(held.keys) and len(refit) + len(held) == len(reviewed)
    assert abs(held.wrong.mean() - reviewed.wrong.mean()) < 0.05  # stratified


def _served(bundle_path: Path, images: np.ndarray) -> GateOutput:
    bundle = load_bundle(bundle_path)
    return load_gate(bundle).run(bundle.normalisation.apply(images))


@pytest.mark.parametrize("default", ["build", "exposed"])
def test_build_from_reviews_refits_the_served_set_and_reports_it(
    tiny_bundle: Path, reviews_dir: tuple[Path, dict[str, int]], tmp_path: Path, default: str
) -> None:
    directory, _ = reviews_dir
    base = tmp_path / "base"
    shutil.copytree(tiny_bundle, base)
    if default == "exposed":  # the default of `make run`'s profile: an open-world set with exposure rows
        fit_default_set(load_bundle(base), "exposed/cond+feat+softmax", exposure_images=60)
    before = served_set(load_bundle(base)).served
    out = tmp_path / "refit"
    code = main(
        ["build", "--from", str(base), "--out", str(out), "--redo", "detectors", "--reviews", str(directory)]
    )
    assert code == 0
    refitted = load_bundle(out)
    detectors = refitted.manifest["detectors"]
    assert detectors["default_set"] == f"{before}-reviewed" and before in detectors["signal_sets"]
    assert refitted.manifest["derived_from"] == load_bundle(base).manifest["bundle_id"]
    assert served_set(refitted).served == before  # a refit of the refit starts from the same set
    report = json.loads((out / "report" / "reviews.json").read_text())
    assert report["base_arm_max_abs_diff_vs_stored"] < 1e-6, "the base arm is not the served set"
    assert report["counts"]["skipped"] == {"made against another class list": 1}
    assert report["counts"]["prediction_changed"] == 0
    assert (
        "Verdict" in (out / "report" / "reviews.md").read_text()
        and (out / "report" / "reviews_roc.png").is_file()
    )
    # the held-out AUROCs the report states are those of the two bundles' served gates
    reviewed = read_reviews(directory, refitted)
    _, held = split_reviews(reviewed, 0.5, seed=0)
    seed0 = report["per_seed"][0]["held_out"]
    refit_gate, base_gate = _served(out, held.images), _served(base, held.images)
    assert abs(roc_auc_score(held.wrong, refit_gate.unified_score) - seed0["auroc"]["reviewed"]) < 1e-6
    assert abs(roc_auc_score(held.wrong, base_gate.unified_score) - seed0["auroc"]["base"]) < 1e-6
    # the free baselines are computed from the same logits (sklearn on MSP and DOCTOR)
    assert abs(roc_auc_score(held.wrong, msp_score(base_gate.logits)) - seed0["auroc"]["msp"]) < 1e-6
    assert abs(roc_auc_score(held.wrong, doctor(base_gate.logits)) - seed0["auroc"]["doctor"]) < 1e-6
    # what the report says each threshold accepts is what the served gates' verdicts accept
    for arm, served_gate in (("reviewed", refit_gate), ("base", base_gate)):
        assert seed0["at_point"][arm]["accepted"] == int((~served_gate.reject).sum())
    assert len(report["per_seed"]) == len(detectors["seeds"])


def test_build_from_reviews_says_what_is_missing(
    tiny_bundle: Path,
    reviews_dir: tuple[Path, dict[str, int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory, _ = reviews_dir
    assert main(["build", "--out", str(tmp_path / "a"), "--reviews", str(directory)]) == 2
    assert "--from BUNDLE --redo detectors" in capsys.readouterr().err
    args = ["build", "--from", str(tiny_bundle), "--redo", "detectors"]
    assert main([*args, "--out", str(tmp_path / "b"), "--reviews", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err
    few = tmp_path / "few"
    write_reviews(tiny_bundle, few, n=6)
    assert main([*args, "--out", str(tmp_path / "c"), "--reviews", str(few)]) == 2
    assert "Review more items" in capsys.readouterr().err

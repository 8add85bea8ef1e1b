"""The operator x rate sweep, checked against a naive recomputation and sklearn on a tiny bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from models.bundle import SWEEP_FILE, load_bundle
from models.data import load_splits
from models.lcr import label_change_rate, predict_naive
from models.mutation import MutantSet, count_filters, filters_for_rate, plan_mutant
from offline.sweep import default_rates, main, run_sweep, sweep_markdown

OPERATORS = ("NAI", "GF")
RATES = (0.001, 0.005)


@pytest.fixture(scope="module")
def swept(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A private copy of the shared bundle with a 2 x 2 sweep of 4 mutants on all val images."""
    path = tmp_path_factory.mktemp("sweep") / "bundle"
    shutil.copytree(tiny_bundle, path)
    bundle = load_bundle(path)
    n_val = len(load_splits(bundle)["val"])
    sweep = run_sweep(
        bundle,
        operators=OPERATORS,
        rates=RATES,
        n_mutants=4,
        images=n_val,
        acceptance_images=n_val,
        progress=False,
    )
    return path, sweep


def test_default_rates_hit_the_filter_targets() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 784, 1))
    rates = default_rates(count_filters(model))
    assert sorted({filters_for_rate(model, r) for r in rates}) == [1, 4, 16]
    assert 0.001 in rates  # the paper's rate, which changes 1 of 784 filters
    assert len(rates) == 3  # 0.001 replaces the other 1-filter rate: same filters, same mutants


def test_sweep_json_structure(swept: tuple[Path, dict]) -> None:
    path, sweep = swept
    on_disk = json.loads((path / SWEEP_FILE).read_text())
    assert on_disk == json.loads(json.dumps(sweep))
    assert [(r["operator"], r["rate"]) for r in sweep["rows"]] == [(o, r) for o in OPERATORS for r in RATES]
    # val is too small for disjoint slices: LCR runs on the acceptance images, and says so.
    assert sweep["lcr_overlaps_acceptance"] is True
    assert sweep["lcr_images"] == sweep["acceptance_images"]
    for row in sweep["rows"]:
        assert row["error"] is None
        mutants = MutantSet.from_dict(row["mutants"])
        assert len(mutants.specs) == 4 and row["kept"] == 4
        assert row["attempts"] == mutants.attempts >= 4
        assert row["acceptance_rate"] == pytest.approx(4 / row["attempts"])
        assert row["kept_accuracy_min"] == min(mutants.accuracies) >= 0.9 * mutants.original_accuracy
        assert row["filters_per_mutant"] == [row["planned_filters"]]
        assert {s.operator for s in mutants.specs} == {row["operator"]}


def test_sweep_lcr_and_auroc_match_a_naive_recomputation(swept: tuple[Path, dict]) -> None:
    path, sweep = swept
    bundle = load_bundle(path)
    model = bundle.load_model()
    val = load_splits(bundle)["val"]
    start, stop = sweep["lcr_images"]
    x = bundle.normalisation.apply(val.images[start:stop])
    with torch.no_grad():
        pred = model(x).argmax(1)
    wrong = pred.numpy() != val.labels[start:stop]
    assert 0 < wrong.sum() < len(wrong) and sweep["lcr_wrong"] == int(wrong.sum())
    for row in sweep["rows"]:
        specs = MutantSet.from_dict(row["mutants"]).specs
        lcr = label_change_rate(predict_naive(model, specs, x), pred).numpy().astype(np.float64)
        assert row["lcr_correct"]["mean"] == pytest.approx(lcr[~wrong].mean(), abs=1e-9)
        assert row["lcr_correct"]["std"] == pytest.approx(lcr[~wrong].std(), abs=1e-9)
        assert row["lcr_wrong"]["mean"] == pytest.approx(lcr[wrong].mean(), abs=1e-9)
        assert row["lcr_wrong"]["std"] == pytest.approx(lcr[wrong].std(), abs=1e-9)
        assert row["auroc"] == pytest.approx(roc_auc_score(wrong, lcr), abs=1e-12)


def test_sweep_keeps_the_bundle_loadable_and_renders_a_row_per_combination(swept: tuple[Path, dict]) -> None:
    path, sweep = swept
    bundle = load_bundle(path)  # verifies every hash, the new file's included
    assert SWEEP_FILE in bundle.manifest["files"]
    text = sweep_markdown(sweep)
    assert text.startswith("## Mutation operators and rates")
    rows = [line for line in text.splitlines() if line.startswith(("| NAI |", "| GF |"))]
    assert len(rows) == len(OPERATORS) * len(RATES)
    best = max(sweep["rows"], key=lambda r: r["auroc"])
    assert f"**{best['operator']} at rate {best['rate']:g}**" in text


def test_impossible_acceptance_is_an_error_row(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    # GF at rate 1.0 redraws every filter: no candidate keeps 90% of the accuracy.
    code = main(
        [
            "--bundle",
            str(path),
            "--operators",
            "GF",
            "NAI",
            "--rates",
            "1.0",
            "--mutants",
            "2",
            "--max-attempts",
            "3",
            "--images",
            "50",
            "--acceptance-images",
            "50",
            "--no-progress",
        ]
    )
    assert code == 0
    sweep = load_bundle(path).read_json(SWEEP_FILE)
    model = load_bundle(path).load_model()
    for row in sweep["rows"]:
        assert row["error"] and "kept" in row["error"]
        assert row["attempts"] == 3 and row["kept"] < 2
        assert (
            row["planned_filters"]
            == plan_mutant(model, row["operator"], 1.0, 0).n_filters
            == count_filters(model)
        )
        assert "auroc" not in row
    out = capsys.readouterr().out
    assert "| GF | 1 |" in out and "failed" in out


def test_report_takes_the_sweep_of_a_bundle_with_the_same_cnn(
    swept: tuple[Path, dict], tiny_bundle: Path, tmp_path: Path
) -> None:
    from cli.main import main as cli_main

    source, sweep = swept
    target = tmp_path / "same-cnn"
    shutil.copytree(tiny_bundle, target)
    assert cli_main(["report", "--bundle", str(target), "--n-boot", "20", "--sweep-from", str(source)]) == 0
    assert load_bundle(target).read_json(SWEEP_FILE) == json.loads(json.dumps(sweep))
    assert "## Mutation operators and rates" in (target / "report" / "report.md").read_text()

    other = tmp_path / "other-cnn"
    shutil.copytree(tiny_bundle, other)
    bundle = load_bundle(other)
    model = bundle.load_model()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    bundle.save_model(model)
    bundle.save()
    assert cli_main(["report", "--bundle", str(other), "--sweep-from", str(source)]) == 2
    assert not load_bundle(other).has_file(SWEEP_FILE)


def test_sweep_refused_where_the_val_images_differ(
    swept: tuple[Path, dict], tiny_bundle: Path, tmp_path: Path, monkeypatch
) -> None:
    """Same weights but other val images: the sweep's LCR figures were measured on other inputs."""
    import dataclasses

    import offline.sweep
    from models.errors import ConfigError
    from offline.sweep import copy_sweep

    source, _ = swept
    target = tmp_path / "other-val"
    shutil.copytree(tiny_bundle, target)
    real = offline.sweep.load_splits

    def other_val(bundle):
        arrays = real(bundle)
        if bundle.path == target:
            images = arrays["val"].images.copy()
            images[0] = 255 - images[0]
            arrays["val"] = dataclasses.replace(arrays["val"], images=images)
        return arrays

    monkeypatch.setattr(offline.sweep, "load_splits", other_val)
    with pytest.raises(ConfigError, match="different val images"):
        copy_sweep(load_bundle(source), load_bundle(target))
    assert not load_bundle(target).has_file(SWEEP_FILE)

"""predgate adaptive: the report's figures follow from the real gate's verdicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cli.main import main
from models.bundle import SCORES_FILE, adaptive_report_files, load_bundle, scores_key
from offline.adaptive_job import point_on_val


def test_adaptive_job_report_follows_the_real_gates_verdicts(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    assert (
        main(
            [
                "adaptive",
                "--bundle",
                str(out),
                "--images",
                "40",
                "--eps",
                "0.15",
                "--steps",
                "4",
                "--attack-mutants",
                "3",
                "--square-queries",
                "40",
                "--verdict-tries",
                "2",
                "--n-boot",
                "100",
                "--sets",
                "cond+lcr",
            ]
        )
        == 0
    )
    files = {k: out / v for k, v in adaptive_report_files(0.15).items()}
    result = json.loads(files["json"].read_text())
    assert files["md"].exists() and files["png"].stat().st_size > 0
    assert set(result["sets"]) == {"msp", "cond+lcr"}  # MSP is always the reference
    lcr_rows = result["sets"]["cond+lcr"]["attacks"]
    assert set(lcr_rows) == {"pgd", "blackbox", "adaptive-known", "adaptive-redrawn", "any"}
    assert set(result["sets"]["msp"]["attacks"]) == {"pgd", "blackbox", "adaptive", "any"}
    for entry in result["sets"].values():
        rows = entry["attacks"]
        for variant, r in rows.items():
            assert 0 <= r["survival_rate"] <= r["success_rate"] <= 1
            assert r["survival_ci"][0] <= r["survival_rate"] <= r["survival_ci"][1]
            if variant != "any":
                assert r["max_linf"] <= 0.15 + 1e-6
                assert rows["any"]["survival_rate"] >= r["survival_rate"]
    assert result["sets"]["msp"]["attacks"]["pgd"]["vs_msp"]["diff"] == 0.0
    assert main(["adaptive", "--bundle", str(out), "--sets", "nope", "--images", "5"]) == 2


def test_adaptive_at_one_point_for_every_set_is_equal_clean_coverage(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """``--point correct-recall=0.7``: each set's threshold accepts 70% of the correct val images
    (checked from the stored val scores by hand), and the report is judged at that point."""
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    args = ["adaptive", "--bundle", str(out), "--images", "30", "--eps", "0.1", "--steps", "2"]
    args += ["--attack-mutants", "2", "--square-queries", "20", "--verdict-tries", "1", "--n-boot", "50"]
    assert main([*args, "--sets", "cond", "--point", "correct-recall=0.7"]) == 0
    result = json.loads((out / adaptive_report_files(0.1, "correct-recall=0.7")["json"]).read_text())
    assert result["point"] == "correct-recall=0.7"
    bundle = load_bundle(out)
    val = bundle.read_features("val")
    correct = val["prediction"] == val["label"]
    stored = bundle.read_arrays(SCORES_FILE)
    for name in ("msp", "cond"):
        assert result["sets"][name]["operating_point"] == "correct-recall=0.7"
        t = point_on_val(bundle, name, "correct-recall=0.7").threshold
        scores = stored[scores_key(0, name, "val")][correct]
        assert (scores <= t).mean() >= 0.7
        below = scores[scores < t]
        assert below.size == 0 or (scores <= below.max()).mean() < 0.7
    assert (
        "equal clean coverage" in (out / adaptive_report_files(0.1, "correct-recall=0.7")["md"]).read_text()
    )

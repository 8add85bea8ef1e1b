"""bench.before_after on hand-made bench.gate / bench.serve JSON: best run per version, ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import before_after


def _gate(path: Path, forward_ms: float, lcr_ms: float) -> Path:
    stages = {"forward": {"ms_per_image": forward_ms}, "lcr_auto": {"ms_per_image": lcr_ms}, "note": "x"}
    path.write_text(json.dumps({"batches": {"1": {"stages": stages}}}))
    return path


def _serve(path: Path, p50: float, rps: float) -> Path:
    rows = [{"signal_set": "msp", "concurrency": 1, "p50_ms": p50, "throughput_rps": rps}]
    path.write_text(json.dumps({"results": {"batched": rows}}))
    return path


def test_gate_runs_keep_the_best_of_each_version_and_their_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = [_gate(tmp_path / f"b{i}.json", f, 40.0 + i) for i, f in enumerate([2.0, 1.8])]
    after = [_gate(tmp_path / f"a{i}.json", f, 30.0) for i, f in enumerate([1.9, 2.2])]
    out = tmp_path / "cmp.json"
    before_after.main(
        ["--kind", "gate", "--before", *map(str, before), "--after", *map(str, after), "--out", str(out)]
    )
    rows = {tuple(r["key"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("forward", "1")]["before_best"] == 1.8 and rows[("forward", "1")]["after_best"] == 1.9
    assert rows[("forward", "1")]["ratio_after_over_before"] == pytest.approx(1.9 / 1.8)
    assert rows[("lcr_auto", "1")]["ratio_after_over_before"] == pytest.approx(30.0 / 40.0)
    assert "| forward | 1 | 1.80 (2.00, 1.80) | 1.90 (1.90, 2.20) | 1.06 |" in capsys.readouterr().out


def test_serve_throughput_takes_the_highest_run(tmp_path: Path) -> None:
    before = [_serve(tmp_path / "b.json", 8.0, 120.0), _serve(tmp_path / "b2.json", 7.5, 110.0)]
    after = [_serve(tmp_path / "a.json", 5.0, 190.0)]
    out = tmp_path / "cmp.json"
    args = ["--kind", "serve", "--before", *map(str, before), "--after", *map(str, after), "--out", str(out)]
    before_after.main([*args, "--stat", "throughput_rps"])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["before_best"] == 120.0 and row["ratio_after_over_before"] == pytest.approx(190.0 / 120.0)
    before_after.main(args)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["before_best"] == 7.5 and row["after_best"] == 5.0

"""The benchmark harness runs end to end on the tiny bundle and reports sane figures (one repetition)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from bench import gate as bench_gate
from bench import serve as bench_serve
from bench.common import peak_rss_bytes


def test_gate_benchmark_reports_every_stage(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "gate.json"
    code = bench_gate.main(
        [
            "--bundle",
            str(tiny_bundle),
            "--batch-sizes",
            "1",
            "4",
            "--repeats",
            "1",
            "--no-memory",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["batches"]) == {"1", "4"}
    expected = set(bench_gate.STAGES) | {"naive_gate"}
    expected.discard("lcr_sequential")  # only for bundles whose LCR stops early (tested with one elsewhere)
    if result["conductance_mode"] != "shortcut":
        expected.discard("conductance_shortcut")
    has_onnx = importlib.util.find_spec("onnx") is not None
    assert (result["onnx_skipped"] is None) == has_onnx
    if not has_onnx:  # the exporter needs the onnx package; the run says so instead of failing
        expected -= set(bench_gate.ONNX_STAGES)
    for n, batch in result["batches"].items():
        stages = batch["stages"]
        assert set(stages) == expected, n
        for name, stage in stages.items():
            for key in ("seconds", "ms_per_image", "forward_equivalents", "forward_equivalents_adjacent"):
                assert math.isfinite(stage[key]) and stage[key] > 0, (n, name, key)
            assert stage["ms_per_image"] == pytest.approx(1000 * stage["seconds"] / int(n))
            if name != "naive_gate":  # the adjacent unit is a median of the forwards timed next to it
                assert stage["forward_equivalents_adjacent"] == pytest.approx(
                    stage["seconds"] / stage["adjacent_forward_s"]
                )
        # the unit is the median plain forward; the naive gate is the sum it claims to be
        assert stages["forward"]["forward_equivalents"] == pytest.approx(1.0)
        parts = ("naive_conductance", "naive_lcr", "detectors")
        assert stages["naive_gate"]["seconds"] == pytest.approx(sum(stages[p]["seconds"] for p in parts))
    targets = result["targets"]
    speed = targets["speedup_vs_naive"]
    small = result["batches"]["1"]["stages"]
    assert speed["speedup"] == pytest.approx(small["naive_gate"]["seconds"] / small["gate_full"]["seconds"])
    if result["conductance_mode"] == "shortcut":
        keys = {"flop_floor": "gate_full"} | ({"flop_floor_onnx": "gate_onnx_full"} if has_onnx else {})
        for key, stage in keys.items():
            floor = targets[key]
            assert floor["floor_forward_equivalents"] == 1 + result["n_mutants"]
            assert floor["ratio_to_floor"] == pytest.approx(  # the verdict uses the drift-free unit
                result["batches"]["4"]["stages"][stage]["forward_equivalents_adjacent"]
                / floor["floor_forward_equivalents"]
            )
    table = bench_gate.markdown(result)
    assert "naive_lcr" in table and "whole gate vs naive reference at bs 1" in table
    assert "| bs 4 x fwd (adj) |" in table
    assert ("gate_onnx_full" in table) == has_onnx


def test_interleaved_runs_put_a_forward_on_each_side_of_every_stage_call() -> None:
    calls: list[str] = []
    runs, forwards = bench_gate.interleaved_runs(
        lambda: calls.append("stage"),
        lambda: calls.append("fwd"),
        repeats=3,
        warmup=1,
        synchronize=lambda: None,
    )
    assert calls == ["stage", "fwd", "stage", "fwd", "stage", "fwd", "stage", "fwd"]
    assert len(runs) == 3 and len(forwards) == 4 and all(t >= 0 for t in runs + forwards)


def test_gate_benchmark_without_onnx(tiny_bundle: Path) -> None:
    result = bench_gate.run_benchmark(tiny_bundle, [2], 1, memory=False, onnx=False)
    assert result["onnx_skipped"] == "--no-onnx" and "flop_floor_onnx" not in result["targets"]
    assert not set(bench_gate.ONNX_STAGES) & set(result["batches"]["2"]["stages"])


@pytest.mark.slow  # one subprocess per probe; a benchmark smoke test
def test_memory_probe(tiny_bundle: Path) -> None:
    # A parent whose peak is far above the child's: a child's ru_maxrss starts at the parent's peak
    # after exec, which once hid every stage's rise; the probe must see its own address space only.
    ballast = b"\x01" * (512 * 2**20)  # written, so resident
    x = torch.zeros(2, *json.loads((tiny_bundle / "manifest.json").read_text())["input_shape"])
    probe = bench_gate.probe_memory(tiny_bundle, "forward", x)
    assert probe["kind"] == "cpu_peak_rss"
    assert isinstance(probe["extra_bytes"], int) and probe["extra_bytes"] > 0
    assert (tiny_bundle / "weights.safetensors").stat().st_size < probe["baseline_bytes"] < peak_rss_bytes()
    del ballast
    with pytest.raises(RuntimeError, match="memory probe for no_such_stage failed"):
        bench_gate.probe_memory(tiny_bundle, "no_such_stage", x)


def test_serve_benchmark_batched_and_unbatched(tiny_bundle: Path) -> None:
    result = bench_serve.run_serve_benchmark(
        bundle=tiny_bundle, concurrency=[1, 4], n_requests=6, signal_sets=["default", "msp"], max_seconds=20
    )
    assert result["images"] == "val images"
    assert set(result["results"]) == {"batched", "unbatched"}
    for mode, rows in result["results"].items():
        assert [(r["signal_set"], r["concurrency"]) for r in rows] == [
            ("default", 1),
            ("default", 4),
            ("msp", 1),
            ("msp", 4),
        ]
        for r in rows:
            assert r["requests_ok"] == 6 and not r["errors"], (mode, r)
            assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
            assert r["throughput_rps"] > 0
            # one client at a time never shares a gate run; without batching nobody does
            if mode == "unbatched" or r["concurrency"] == 1:
                assert r["mean_batch_size"] == 1
    ratios = {r["signal_set"]: r for r in result["batching_ratio"]}
    assert set(ratios) == {"default", "msp"}
    for r in ratios.values():
        assert r["concurrency"] == 4 and math.isfinite(r["ratio"]) and r["ratio"] > 0
    assert "| batched | msp | 4 |" in bench_serve.markdown(result)


def test_explain_benchmark_times_every_method(tiny_bundle: Path, tmp_path: Path) -> None:
    from bench import explain as bench_explain
    from models.explanations import METHODS

    out = tmp_path / "explain.json"
    assert (
        bench_explain.main(
            [
                "--bundle",
                str(tiny_bundle),
                "--batch-sizes",
                "2",
                "--repeats",
                "1",
                "--ig-steps",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    row = json.loads(out.read_text())["per_image_ms"]["2"]
    assert set(row) == {"forward_ms", *(f"{m}_ms" for m in METHODS)}
    # an explanation is at least a forward pass (it makes two, and a backward)
    assert all(math.isfinite(v) and v > row["forward_ms"] > 0 for k, v in row.items() if k != "forward_ms")

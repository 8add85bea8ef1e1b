"""bench.gate_threads on the tiny bundle: one row per set and batch, both thread counts timed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import gate_threads


def test_gate_threads_times_each_batch_on_one_and_on_all_threads(tiny_bundle: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "threads.json"
    gate_threads.main(
        [
            "--bundle",
            str(tiny_bundle),
            "--batch-sizes",
            "1",
            "4",
            "--signal-sets",
            "msp",
            "default",
            "--repeats",
            "2",
            "--threads",
            "2",
            "--out",
            str(out),
        ]
    )
    assert torch.get_num_threads() == 2
    torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert [(r["signal_set"] == "msp", r["batch_size"]) for r in result["rows"]] == [
        (True, 1),
        (True, 4),
        (False, 1),
        (False, 4),
    ]
    for row in result["rows"]:
        assert row["ms_one_thread"] > 0 and row["ms_all_threads"] > 0
        assert row["ratio_one_over_all"] == row["ms_one_thread"] / row["ms_all_threads"]
    assert set(result["all_threads_win_from"]) == {r["signal_set"] for r in result["rows"]}


def test_the_crossover_is_where_all_threads_win_from_then_on() -> None:
    def row(name: str, bs: int, ratio: float) -> dict[str, object]:
        return {"signal_set": name, "batch_size": bs, "ratio_one_over_all": ratio}

    rows = [
        row("a", 8, 1.4),
        row("a", 1, 1.1),
        row("a", 2, 0.9),
        row("a", 4, 1.2),  # noise win at 1
        row("b", 1, 0.5),
        row("b", 2, 0.8),  # one thread wins throughout
        row("c", 1, 1.3),
        row("c", 2, 1.5),
    ]
    assert gate_threads.crossover(rows) == {"a": 4, "b": None, "c": 1}

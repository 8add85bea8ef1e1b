"""The gate as the batcher's batch function: rows joined back without a copy, plans as group keys,
answers that are rows of one gate output."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from models.bundle import Bundle
from models.gate import Gate
from service.gate_batches import GateBatches, gate_batcher, stack_rows


def test_consecutive_rows_of_one_batch_are_joined_as_a_view() -> None:
    x = torch.randn(5, 1, 4, 4)
    rows = list(x)  # what Batcher.submit queues: one view per image
    joined = stack_rows(rows)
    assert torch.equal(joined, x)
    assert joined.data_ptr() == x.data_ptr()  # no copy
    middle = stack_rows(rows[1:4])
    assert torch.equal(middle, x[1:4]) and middle.data_ptr() == x[1].data_ptr()


def test_a_channels_last_batch_is_joined_as_a_view_in_its_own_layout() -> None:
    x = torch.randn(4, 6, 6, 3).permute(0, 3, 1, 2)  # decoded pixels: N x C x H x W, channels last
    joined = stack_rows(list(x))
    assert torch.equal(joined, x) and joined.data_ptr() == x.data_ptr() and joined.stride() == x.stride()


def test_rows_from_several_requests_or_out_of_order_are_stacked() -> None:
    a, b = torch.randn(2, 1, 4, 4), torch.randn(3, 1, 4, 4)
    mixed = [a[0], a[1], b[0], b[2]]
    joined = stack_rows(mixed)
    assert torch.equal(joined, torch.stack(mixed))
    assert joined.data_ptr() not in {a.data_ptr(), b.data_ptr()}
    backwards = [b[2], b[1], b[0]]
    assert torch.equal(stack_rows(backwards), b.flip(0))
    strided = torch.randn(4, 1, 4, 8)[..., ::2]  # non-contiguous rows: stacked, not viewed
    assert torch.equal(stack_rows(list(strided)), strided)


def test_answers_are_rows_of_one_gate_output_equal_to_gate_run(
    gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    x = bundle.normalisation.apply(sample_images[:6])
    plan = gate.plan(full_evidence=True)
    expected = gate.run(x, plan=plan)

    async def main() -> list:  # type: ignore[type-arg]
        batcher = gate_batcher(gate, max_batch_size=8, max_queue_delay_s=0.0, queue_limit=16)
        await batcher.start()
        try:
            return await batcher.results(batcher.submit(x, plan))
        finally:
            await batcher.stop()

    answers = asyncio.run(main())
    assert [a.index for a in answers] == list(range(6))
    assert len({id(a.output) for a in answers}) == 1  # one output for the batch, not six copies
    out = answers[0].output
    assert len(out) == 6 and answers[0].batch_size == 6
    np.testing.assert_allclose(out.unified_score, expected.unified_score, atol=1e-6)
    np.testing.assert_array_equal(out.reject, expected.reject)
    assert [out.verdict(i) for i in range(6)] == ["unknown" if r else "accept" for r in expected.reject]


def test_small_batches_run_on_one_thread_and_large_ones_on_all(
    gate: Gate, bundle: Bundle, sample_images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_run = gate.run

    def recording_run(x: torch.Tensor, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return real_run(x, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gate, "run", recording_run)
    before = torch.get_num_threads()
    try:
        batches = GateBatches(gate, single_thread_below=4, threads=2)
        plan = gate.plan()
        for n in (1, 3, 4, 8):
            out = batches(bundle.normalisation.apply(sample_images[:n]), plan)
            assert len(out) == n
        never = GateBatches(gate, single_thread_below=0, threads=2)
        never(bundle.normalisation.apply(sample_images[:1]), plan)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 2, 2, 2]

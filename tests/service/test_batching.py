"""The batcher alone, with a transparent batch function (each row is computed from its own image),
so that order, grouping, limits and draining are checked without the model."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from models.gate import GateOutput
from models.operating_points import OperatingPoint
from service.batching import Batched, Batcher
from service.errors import BatchStuck, DeadlineExceeded, OutOfMemory, QueueFull, ShuttingDown


class GroupKey(NamedTuple):
    """The batcher groups by any hashable key; the gate's is a GatePlan, these tests use names."""

    signal_set: str
    operating_point: str
    full_evidence: bool


KEY = GroupKey("msp", "equal-recall", False)
OTHER = GroupKey("cond+lcr", "equal-recall", True)


class Recorder:
    """Batch function that records each call; row i's unified score is image i's first pixel."""

    def __init__(self, delay: float = 0.0, fail: bool = False, short: bool = False) -> None:
        self.calls: list[tuple[GroupKey, int]] = []
        self.threads: set[int] = set()
        self.delay, self.fail, self.short = delay, fail, short

    def __call__(self, x: torch.Tensor, key: GroupKey) -> GateOutput:
        self.calls.append((key, x.shape[0]))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        if self.fail:
            raise ValueError("boom")
        n = x.shape[0] - (1 if self.short else 0)
        score = x.reshape(x.shape[0], -1)[:n, 0].double().numpy()
        point = OperatingPoint(
            name=key.operating_point,
            threshold=0.5,
            correct_recall=1.0,
            wrong_recall=1.0,
            coverage=1.0,
            risk=0.0,
        )
        return GateOutput(
            logits=np.zeros((n, 3)),
            probabilities=np.full((n, 3), 1 / 3),
            prediction=np.zeros(n, dtype=np.int64),
            conductance=None,
            cond_score=None,
            lcr=None,
            unified_score=score,
            reject=score > 0.5,
            signal_set=key.signal_set,
            operating_point=point,
            seconds={"forward": 0.001, "detectors": 0.0},
        )


def make(fn: Any, **kwargs: Any) -> Batcher[Any, torch.Tensor, GateOutput]:
    """A batcher over ``fn`` whose batches are the stacked images (as the gate's)."""
    return Batcher(fn, collate=torch.stack, **kwargs)


def score(answer: Batched[GateOutput]) -> float:
    return float(answer.output.unified_score[answer.index])


def rejected(answer: Batched[GateOutput]) -> bool:
    return bool(answer.output.reject[answer.index])


def images(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_concurrent_requests_share_a_batch_and_get_their_own_rows() -> None:
    async def main() -> None:
        fn = Recorder()
        batcher = make(fn, max_batch_size=8, max_queue_delay_s=0.05, queue_limit=32)
        await batcher.start()
        values = [0.1 * i for i in range(6)]
        futures = [batcher.submit(images([v]), KEY)[0] for v in values]
        rows = await asyncio.gather(*futures)
        await batcher.stop()
        assert fn.calls == [(KEY, 6)]
        assert [score(r) for r in rows] == pytest.approx(values)
        assert [rejected(r) for r in rows] == [v > 0.5 for v in values]
        assert all(r.batch_size == 6 and r.queue_seconds >= 0 for r in rows)
        assert threading.get_ident() not in fn.threads and len(fn.threads) == 1  # one thread, off the loop

    run(main())


def test_groups_run_separately_and_batches_respect_the_size_cap() -> None:
    async def main() -> None:
        fn = Recorder()
        batcher = make(fn, max_batch_size=4, max_queue_delay_s=0.05, queue_limit=32)
        await batcher.start()
        a = batcher.submit(images([0.1, 0.2, 0.3]), KEY)
        b = batcher.submit(images([0.9]), OTHER)
        c = batcher.submit(images([0.4, 0.6]), KEY)
        rows = await asyncio.gather(*a, *b, *c)
        await batcher.stop()
        assert [r.output.signal_set for r in rows] == ["msp"] * 3 + ["cond+lcr"] + ["msp"] * 2
        assert [score(r) for r in rows] == pytest.approx([0.1, 0.2, 0.3, 0.9, 0.4, 0.6])
        # first round takes 4 images (3 KEY + 1 OTHER: two runs), the second the remaining 2
        assert fn.calls == [(KEY, 3), (OTHER, 1), (KEY, 2)]

    run(main())


def test_queue_full_refuses_the_whole_request() -> None:
    async def main() -> None:
        fn = Recorder(delay=0.2)
        batcher = make(fn, max_batch_size=1, max_queue_delay_s=0.0, queue_limit=3)
        await batcher.start()
        first = batcher.submit(images([0.1]), KEY)
        await asyncio.sleep(0.05)  # the worker is now busy with it
        queued = batcher.submit(images([0.2, 0.3]), KEY)
        with pytest.raises(QueueFull, match="limit 3"):
            batcher.submit(images([0.4, 0.5]), KEY)  # 2 + 2 > 3: none of them is queued
        assert batcher.depth == 2
        later = batcher.submit(images([0.6]), KEY)  # exactly fills the queue
        rows = await asyncio.gather(*first, *queued, *later)
        await batcher.stop()
        assert [score(r) for r in rows] == pytest.approx([0.1, 0.2, 0.3, 0.6])

    run(main())


def test_stop_finishes_queued_work_then_refuses() -> None:
    async def main() -> None:
        fn = Recorder(delay=0.05)
        batcher = make(fn, max_batch_size=2, max_queue_delay_s=1.0, queue_limit=32)
        await batcher.start()
        futures = batcher.submit(images([0.1, 0.2, 0.3, 0.4, 0.5]), KEY)
        await batcher.stop()  # does not wait out the 1 s delay, and drops nothing
        assert all(f.done() for f in futures)
        assert [score(f.result()) for f in futures] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
        assert sum(n for _, n in fn.calls) == 5
        with pytest.raises(ShuttingDown):
            batcher.submit(images([0.1]), KEY)

    run(main())


def test_failures_reach_every_caller_and_the_loop_survives() -> None:
    async def main() -> None:
        fn = Recorder(fail=True)
        batcher = make(fn, max_batch_size=8, max_queue_delay_s=0.01, queue_limit=32)
        await batcher.start()
        futures = batcher.submit(images([0.1, 0.2]), KEY)
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, ValueError) and str(r) == "boom" for r in results)
        fn.fail, fn.short = False, True
        results = await asyncio.gather(*batcher.submit(images([0.1, 0.2]), KEY), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "1 rows for 2 images" in str(r) for r in results)
        fn.short = False
        (row,) = await asyncio.gather(*batcher.submit(images([0.7]), KEY))
        assert rejected(row)
        await batcher.stop()

    run(main())


def test_cancelled_callers_are_skipped() -> None:
    async def main() -> None:
        fn = Recorder()
        batcher = make(fn, max_batch_size=8, max_queue_delay_s=0.05, queue_limit=32)
        await batcher.start()
        gone = batcher.submit(images([0.1]), KEY)
        kept = batcher.submit(images([0.2]), KEY)
        gone[0].cancel()
        (row,) = await asyncio.gather(*kept)
        await batcher.stop()
        assert fn.calls == [(KEY, 1)] and score(row) == pytest.approx(0.2)

    run(main())


def test_a_lone_request_on_an_idle_worker_is_not_held_for_the_delay() -> None:
    async def main() -> None:
        fn = Recorder(delay=0.05)
        batcher = make(fn, max_batch_size=8, max_queue_delay_s=1.0, queue_limit=32)
        await batcher.start()
        started = time.perf_counter()
        (row,) = await asyncio.gather(*batcher.submit(images([0.3]), KEY))
        assert time.perf_counter() - started < 0.5 and row.queue_seconds < 0.1  # not the 1 s delay
        # the next request of a closed-loop client is not held either
        (row,) = await asyncio.gather(*batcher.submit(images([0.4]), KEY))
        assert row.queue_seconds < 0.1
        # work arriving while a batch runs: the worker is busy and the arrivals wait to fill one batch
        running = batcher.submit(images([0.5]), KEY)
        await asyncio.sleep(0.01)
        first = batcher.submit(images([0.1]), KEY)
        await asyncio.sleep(0.01)
        second = batcher.submit(images([0.2]), KEY)
        rows = await asyncio.gather(*running, *first, *second)
        await batcher.stop()
        assert fn.calls == [(KEY, 1)] * 3 + [(KEY, 2)] and [r.batch_size for r in rows] == [1, 2, 2]

    run(main())


# ------------------------------------------------------------------------------------------ faults
POISON = 0.666


class Faulty(Recorder):
    """Recorder that fails like a real gate can: on a poisoned image (first pixel ``POISON``), or out
    of memory on batches larger than ``fits`` images."""

    def __init__(
        self, fits: int | None = None, error: type[BaseException] = ValueError, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.fits, self.error = fits, error

    def __call__(self, x: torch.Tensor, key: GroupKey) -> GateOutput:
        if self.fits is not None and x.shape[0] > self.fits:
            self.calls.append((key, x.shape[0]))
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        if (x.reshape(x.shape[0], -1)[:, 0] - POISON).abs().min() < 1e-6:
            self.calls.append((key, x.shape[0]))
            raise self.error("poisoned image")
        return super().__call__(x, key)


def test_a_poisoned_image_fails_alone_and_its_batch_mates_get_their_rows() -> None:
    async def main() -> None:
        fn = Faulty()
        batcher = make(fn, max_batch_size=8, max_queue_delay_s=0.05, queue_limit=32)
        await batcher.start()
        values = [0.1, 0.2, POISON, 0.4, 0.5, 0.6]
        futures = [batcher.submit(images([v]), KEY)[0] for v in values]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        assert isinstance(results[2], ValueError) and str(results[2]) == "poisoned image"
        rows = [r for i, r in enumerate(results) if i != 2]
        assert [score(r) for r in rows] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.6])  # type: ignore[union-attr]
        # one run of 6 fails; halves of 3, then the poisoned half split again, down to the poisoned image
        assert fn.calls[0] == (KEY, 6) and (KEY, 1) in fn.calls and len(fn.calls) <= 7

    run(main())


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_splits_the_batch_and_a_single_image_answers_503(error: type[BaseException]) -> None:
    async def main() -> None:
        fn = Faulty(fits=2, error=error)
        batcher = make(fn, max_batch_size=8, max_queue_delay_s=0.05, queue_limit=32)
        await batcher.start()
        rows = await batcher.results(batcher.submit(images([0.1 * i for i in range(8)]), KEY))
        assert [score(r) for r in rows] == pytest.approx([0.1 * i for i in range(8)])
        assert max(r.batch_size for r in rows) == 2 and fn.calls[0] == (KEY, 8)
        fn.fits = 0  # not even one image fits
        with pytest.raises(OutOfMemory, match="out of memory") as raised:
            await batcher.results(batcher.submit(images([0.3]), KEY))
        assert raised.value.status_code == 503 and raised.value.retry_after
        fn.fits = None
        (row,) = await batcher.results(batcher.submit(images([0.2]), KEY))
        assert score(row) == pytest.approx(0.2)
        await batcher.stop()

    run(main())


def test_exceptions_in_the_loop_itself_never_stop_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the batching code (injected into ``answers_of``) and a BaseException raised by the
    gate's thread fail their batch's callers; the loop carries on."""
    from service import batching

    real_split = batching.answers_of
    calls = {"n": 0}

    def broken_once(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("bug in the batching code")
        return real_split(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(batching, "answers_of", broken_once)

    class Exits(Recorder):
        def __call__(self, x: torch.Tensor, key: GroupKey) -> GateOutput:
            if x.reshape(-1)[0] == POISON:
                raise SystemExit(3)
            return super().__call__(x, key)

    async def main() -> None:
        batcher = make(Exits(), max_batch_size=8, max_queue_delay_s=0.01, queue_limit=32)
        await batcher.start()
        failed = await asyncio.gather(*batcher.submit(images([0.1, 0.2]), KEY), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "internal error while batching" in str(r) for r in failed)
        (exited,) = await asyncio.gather(*batcher.submit(images([POISON]), KEY), return_exceptions=True)
        assert isinstance(exited, RuntimeError) and "SystemExit" in str(exited)
        assert batcher.running
        (row,) = await batcher.results(batcher.submit(images([0.7]), KEY))
        assert rejected(row)
        await batcher.stop()

    run(main())


def test_an_expired_image_is_dropped_from_the_queue_not_computed() -> None:
    async def main() -> None:
        fn = Recorder(delay=0.3)
        batcher = make(fn, max_batch_size=8, max_queue_delay_s=0.0, queue_limit=32)
        await batcher.start()
        busy = batcher.submit(images([0.1]), KEY)
        await asyncio.sleep(0.05)  # the worker now runs the first image for 0.3 s
        now = time.monotonic()
        expired = batcher.submit(images([0.2]), KEY, deadline=now + 0.05)  # expires while queued
        waiter = batcher.submit(images([0.3, 0.4]), KEY, deadline=now + 0.1)
        kept = batcher.submit(images([0.5]), KEY, deadline=now + 5)
        with pytest.raises(DeadlineExceeded, match="2 of 2 image"):
            await batcher.results(waiter, now + 0.1)  # its caller gives up: both images leave the queue
        assert batcher.depth == 2  # the expired one (not yet taken) and the kept one
        rows = await batcher.results(busy + kept)
        (error,) = await asyncio.gather(*expired, return_exceptions=True)
        await batcher.stop()
        assert (
            isinstance(error, DeadlineExceeded) and error.status_code == 504 and "not computed" in str(error)
        )
        assert [score(r) for r in rows] == pytest.approx([0.1, 0.5])
        assert fn.calls == [(KEY, 1), (KEY, 1)]  # 0.2, 0.3 and 0.4 never reached the gate

    run(main())


def test_the_watchdog_flags_a_stuck_batch_until_it_returns() -> None:
    from service import metrics

    async def main() -> None:
        release = threading.Event()

        class Stuck(Recorder):
            def __call__(self, x: torch.Tensor, key: GroupKey) -> GateOutput:
                release.wait(5)
                return super().__call__(x, key)

        batcher = make(Stuck(), max_batch_size=8, max_queue_delay_s=0.0, queue_limit=32, watchdog_s=0.2)
        await batcher.start()
        first = batcher.submit(images([0.1]), KEY)
        await asyncio.sleep(0.1)
        assert batcher.stuck_for() is None  # running, not yet past the limit
        await asyncio.sleep(0.5)
        stuck = batcher.stuck_for()
        assert stuck is not None and stuck > 0.2
        assert metrics.BATCH_STUCK._value.get() == 1  # the watchdog task noticed
        with pytest.raises(BatchStuck, match="watchdog"):
            batcher.submit(images([0.2]), KEY)
        release.set()
        (row,) = await batcher.results(first)
        await asyncio.sleep(0.4)
        assert batcher.stuck_for() is None and metrics.BATCH_STUCK._value.get() == 0
        (row,) = await batcher.results(batcher.submit(images([0.3]), KEY))
        assert score(row) == pytest.approx(0.3)
        await batcher.stop()

    run(main())

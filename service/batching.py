"""Dynamic micro-batching in the shape of Ray Serve's ``@serve.batch``.

Three parts:

- :class:`PendingImage`, one waiting image with the future its caller awaits;
- a bounded queue (:class:`Batcher`): ``submit`` enqueues all of a request's images or none of them,
  and answers :class:`~service.errors.QueueFull` (HTTP 503) when they would not fit;
- one worker loop that takes up to ``max_batch_size`` images; it waits up to ``max_queue_delay`` for
  a batch to fill only while busy (work arrived while the last batch ran), so a lone request on an
  idle worker, or a closed-loop client's next request, starts at once, and batches form when work
  piles up; it groups them by :class:`GroupKey` (signal set, operating point,
  full evidence: images that need the same computation), runs the batch function once per group on a
  single worker thread (off the event loop, so requests keep arriving while the gate runs), checks that
  it returned one row per image, and resolves each future with its row or the group's exception.

Closing the batcher refuses new work, finishes every image already queued, then stops the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from models.gate import GateOutput
from models.operating_points import OperatingPoint
from service import metrics
from service.errors import QueueFull, ShuttingDown

log = logging.getLogger("predgate.service")


class GroupKey(NamedTuple):
    """What makes two images computable in one gate run."""

    signal_set: str
    operating_point: str
    full_evidence: bool


@dataclass(frozen=True)
class Row:
    """One image's share of a :class:`~models.gate.GateOutput`, plus how it was batched.

    ``probabilities`` and ``conductance`` are 1-D (``K`` classes, ``C`` channels); ``seconds`` holds
    the gate stages of the whole batch; ``queue_seconds`` this image's wait before its batch started.
    """

    probabilities: np.ndarray
    prediction: int
    conductance: np.ndarray | None
    cond_score: float | None
    lcr: float | None
    mutants_used: int | None
    unified_score: float
    reject: bool
    signal_set: str
    operating_point: OperatingPoint
    seconds: dict[str, float]
    queue_seconds: float
    batch_size: int


def split_rows(out: GateOutput, queue_seconds: list[float]) -> list[Row]:
    """Cut a gate output into one :class:`Row` per image, in batch order."""
    n = len(queue_seconds)

    def opt(values: np.ndarray | None, i: int) -> float | None:
        return None if values is None else float(values[i])

    return [
        Row(
            probabilities=out.probabilities[i],
            prediction=int(out.prediction[i]),
            conductance=None if out.conductance is None else out.conductance[i],
            cond_score=opt(out.cond_score, i),
            lcr=opt(out.lcr, i),
            mutants_used=None if out.mutants_used is None else int(out.mutants_used[i]),
            unified_score=float(out.unified_score[i]),
            reject=bool(out.reject[i]),
            signal_set=out.signal_set,
            operating_point=out.operating_point,
            seconds=dict(out.seconds),
            queue_seconds=queue_seconds[i],
            batch_size=n,
        )
        for i in range(n)
    ]


@dataclass
class PendingImage:
    """One image waiting for its batch: ``x`` is ``C x H x W`` (normalised)."""

    x: torch.Tensor
    key: GroupKey
    future: asyncio.Future[Row]
    enqueued: float = field(default_factory=time.perf_counter)


BatchFunction = Callable[[torch.Tensor, GroupKey], GateOutput]
"""Runs the gate on ``N x C x H x W`` for one group; called on the worker thread."""


class Batcher:
    """Bounded queue plus one worker loop; see the module docstring.

    Parameters
    ----------
    run_batch : the batch function (blocking; runs on a dedicated thread).
    max_batch_size : most images taken from the queue per round.
    max_queue_delay_s : how long the loop waits, after the first image, for a batch to fill.
    queue_limit : most images waiting; ``submit`` beyond it raises :class:`QueueFull`.
    """

    def __init__(
        self, run_batch: BatchFunction, *, max_batch_size: int, max_queue_delay_s: float, queue_limit: int
    ) -> None:
        if max_batch_size < 1 or queue_limit < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and queue_limit must be >= 1, max_queue_delay_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.queue_limit = queue_limit
        self._queue: deque[PendingImage] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running = False
        self._arrived_while_running = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predgate-gate")
        self._task = asyncio.create_task(self._loop(), name="predgate-batcher")

    def submit(self, images: torch.Tensor, key: GroupKey) -> list[asyncio.Future[Row]]:
        """Queue every image of ``images`` (``N x C x H x W``) or none; one future per image, in order."""
        if self._closing or self._task is None:
            raise ShuttingDown(
                "the server is shutting down" if self._closing else "the batcher is not running"
            )
        n = int(images.shape[0])
        if len(self._queue) + n > self.queue_limit:
            raise QueueFull(
                f"queue full: {len(self._queue)} images waiting, limit {self.queue_limit}; retry shortly"
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Row]] = []
        for i in range(n):
            future: asyncio.Future[Row] = loop.create_future()
            self._queue.append(PendingImage(images[i], key, future))
            futures.append(future)
        metrics.QUEUE_DEPTH.set(len(self._queue))
        self._arrived_while_running = self._arrived_while_running or self._running
        self._wakeup.set()
        return futures

    async def stop(self) -> None:
        """Refuse new work, finish what is queued, then stop the loop and its thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ----------------------------------------------------------------- the worker loop
    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wait(None)
                continue
            if self._arrived_while_running:
                # busy: work arrived while the last batch ran, so waiting to fill one batch pays
                deadline = loop.time() + self.max_queue_delay_s
                while len(self._queue) < self.max_batch_size and not self._closing:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    await self._wait(remaining)
            else:
                # idle worker: a lone request is not held for the delay; only requests that arrived
                # in the same event-loop turn join it
                await asyncio.sleep(0)
            take = min(self.max_batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(take)]
            metrics.QUEUE_DEPTH.set(len(self._queue))
            self._running, self._arrived_while_running = True, False
            try:
                await self._run(batch)
            except Exception:  # a bug in this loop must not stop the service
                log.exception("batching loop failed on a batch of %d", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(RuntimeError("internal error while batching"))
            self._running = False

    async def _run(self, batch: list[PendingImage]) -> None:
        groups: dict[GroupKey, list[PendingImage]] = {}
        for item in batch:
            if not item.future.done():  # the caller went away (cancelled): skip its image
                groups.setdefault(item.key, []).append(item)
        loop = asyncio.get_running_loop()
        for key, items in groups.items():
            started = time.perf_counter()
            waits = [started - item.enqueued for item in items]
            x = torch.stack([item.x for item in items])
            try:
                out = await loop.run_in_executor(self._executor, self.run_batch, x, key)
                if len(out.prediction) != len(items):
                    raise RuntimeError(
                        f"batch function returned {len(out.prediction)} rows for {len(items)} images"
                    )
                rows: list[Row] | None = split_rows(out, waits)
                error: BaseException | None = None
            except Exception as exc:  # noqa: BLE001 - any failure is sent to every caller of this group
                rows, error = None, exc
            if rows is not None:
                metrics.BATCH_SIZE.observe(len(items))
                for stage, seconds in out.seconds.items():
                    metrics.STAGE_SECONDS.labels(stage=stage).observe(seconds)
            for i, item in enumerate(items):
                if item.future.done():
                    continue
                if rows is not None:
                    item.future.set_result(rows[i])
                else:
                    assert error is not None
                    item.future.set_exception(error)

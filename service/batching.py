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

Faults stay local:

- a gate run that raises on several images is split in halves and each half retried, down to single
  images, so one poisoned image fails alone and its batch-mates get their rows; running out of memory
  is handled the same way, and a single image that still runs out answers
  :class:`~service.errors.OutOfMemory` (503);
- an image whose request deadline has passed when its batch is formed is dropped, not computed
  (:class:`~service.errors.DeadlineExceeded`, 504), and a caller that gives up (its deadline passed
  while it waited) takes its images out of the queue at once;
- a failure of the loop itself (a bug) fails that batch's callers and the loop carries on;
- a watchdog notes a gate run that lasts longer than ``watchdog_s``: :meth:`Batcher.stuck_for` is set
  (readiness turns false, new work is refused with :class:`~service.errors.BatchStuck`) until it returns.

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
from prometheus_client import Gauge, Histogram

from models.gate import GateOutput
from models.operating_points import OperatingPoint
from service import metrics
from service.errors import BatchStuck, DeadlineExceeded, OutOfMemory, QueueFull, ShuttingDown

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


@dataclass(eq=False)  # compared by identity: the queue removes a given item, never an equal one
class PendingImage:
    """One image waiting for its batch: ``x`` is ``C x H x W`` (normalised); ``deadline`` is a
    ``time.monotonic()`` instant after which its caller no longer wants the answer (None: no limit)."""

    x: torch.Tensor
    key: GroupKey
    future: asyncio.Future[Row]
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float | None = None


def is_out_of_memory(exc: BaseException) -> bool:
    """Host or device allocation failure: ``MemoryError``, ``torch.OutOfMemoryError`` (CUDA), or the
    RuntimeError torch's CPU allocator raises."""
    if isinstance(exc, MemoryError):
        return True
    cuda_oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if cuda_oom is not None and isinstance(exc, cuda_oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass(frozen=True)
class BatcherMetrics:
    """Where a batcher reports its queue depth, batch sizes and gate stages: the primary gate's
    batcher and the cascade's each have their own, so one queue's depth never overwrites the other's."""

    queue_depth: Gauge
    batch_size: Histogram
    stage_prefix: str = ""


PRIMARY_METRICS = BatcherMetrics(metrics.QUEUE_DEPTH, metrics.BATCH_SIZE)
CASCADE_METRICS = BatcherMetrics(metrics.CASCADE_QUEUE_DEPTH, metrics.CASCADE_BATCH_SIZE, "cascade_")


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
    watchdog_s : a gate run longer than this counts as stuck (None: no watchdog).
    batcher_metrics : the queue-depth gauge, batch-size histogram and stage-label prefix it reports to.
    """

    def __init__(
        self,
        run_batch: BatchFunction,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        queue_limit: int,
        watchdog_s: float | None = None,
        batcher_metrics: BatcherMetrics = PRIMARY_METRICS,
    ) -> None:
        if max_batch_size < 1 or queue_limit < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and queue_limit must be >= 1, max_queue_delay_s >= 0")
        if watchdog_s is not None and watchdog_s <= 0:
            raise ValueError("watchdog_s must be > 0 (or None)")
        self.run_batch = run_batch
        self.metrics = batcher_metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.queue_limit = queue_limit
        self.watchdog_s = watchdog_s
        self._gate_started: float | None = None  # time.monotonic() when the running gate call began
        self._watchdog: asyncio.Task[None] | None = None
        self._stuck_reported = False
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

    def stuck_for(self) -> float | None:
        """Seconds the running gate call has lasted when that is over ``watchdog_s``, else None."""
        if self.watchdog_s is None or self._gate_started is None:
            return None
        seconds = time.monotonic() - self._gate_started
        return seconds if seconds > self.watchdog_s else None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predgate-gate")
        self._task = asyncio.create_task(self._loop(), name="predgate-batcher")
        if self.watchdog_s is not None:
            self._watchdog = asyncio.create_task(self._watch(self.watchdog_s), name="predgate-watchdog")

    def submit(
        self, images: torch.Tensor, key: GroupKey, deadline: float | None = None
    ) -> list[asyncio.Future[Row]]:
        """Queue every image of ``images`` (``N x C x H x W``) or none; one future per image, in order.

        ``deadline`` (``time.monotonic()``): images still queued then are dropped, not computed. A
        future cancelled by its caller takes its image out of the queue."""
        if self._closing or self._task is None:
            raise ShuttingDown(
                "the server is shutting down" if self._closing else "the batcher is not running"
            )
        stuck = self.stuck_for()
        if stuck is not None:
            raise BatchStuck(
                f"a gate batch has been running for {stuck:.1f} s, over the watchdog limit of "
                f"{self.watchdog_s:g} s; this replica is not ready, retry on another"
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
            item = PendingImage(images[i], key, future, deadline=deadline)
            future.add_done_callback(self._withdraw_if_cancelled(item))
            self._queue.append(item)
            futures.append(future)
        self.metrics.queue_depth.set(len(self._queue))
        self._arrived_while_running = self._arrived_while_running or self._running
        self._wakeup.set()
        return futures

    def _withdraw_if_cancelled(self, item: PendingImage) -> Callable[[asyncio.Future[Row]], None]:
        def callback(future: asyncio.Future[Row]) -> None:
            if future.cancelled():
                try:
                    self._queue.remove(item)  # still queued: its place goes to the next request
                except ValueError:
                    return  # already taken into a batch, which skips it
                self.metrics.queue_depth.set(len(self._queue))

        return callback

    async def results(self, futures: list[asyncio.Future[Row]], deadline: float | None = None) -> list[Row]:
        """The rows of ``futures`` (from :meth:`submit`), in order (the first image's exception, if
        any, is raised once all have finished). Past ``deadline`` the caller stops waiting with
        :class:`DeadlineExceeded`; its images still queued leave the queue uncomputed."""
        if not futures:
            return []
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        done, pending = await asyncio.wait(futures, timeout=timeout)
        if pending:
            for future in done:
                future.exception()  # retrieved: it is superseded by the deadline's answer
            gone = {id(future) for future in pending}
            kept = [item for item in self._queue if id(item.future) not in gone]
            queued = len(self._queue) - len(kept)
            self._queue.clear()  # its queued images leave now, their places free for the next request
            self._queue.extend(kept)
            self.metrics.queue_depth.set(len(self._queue))
            for future in pending:
                future.cancel()  # a running batch skips these
            if queued:
                metrics.DEADLINE_EXPIRED.labels(where="queued").inc(queued)
            if len(pending) > queued:
                metrics.DEADLINE_EXPIRED.labels(where="running").inc(len(pending) - queued)
            raise DeadlineExceeded(
                f"the request's deadline passed before its answer was ready ({queued} of {len(futures)} "
                "image(s) still queued were dropped, not computed); send a longer X-Request-Timeout or "
                "retry when the server is less busy"
            )
        errors = [future.exception() for future in futures]  # every one retrieved, the first raised
        first = next((error for error in errors if error is not None), None)
        if first is not None:
            raise first
        return [future.result() for future in futures]

    async def stop(self) -> None:
        """Refuse new work, finish what is queued, then stop the loop and its thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _watch(self, limit: float) -> None:
        """Log and export (``predgate_batch_stuck``) a gate run that passes ``limit``, and its end."""
        interval = min(1.0, limit / 4)
        while True:
            await asyncio.sleep(interval)
            stuck = self.stuck_for()
            if stuck is not None and not self._stuck_reported:
                self._stuck_reported = True
                metrics.BATCH_STUCK.set(1)
                log.error(
                    "gate batch running for %.1f s, over the watchdog limit of %g s: not ready until it returns",
                    stuck,
                    limit,
                )
            elif stuck is None and self._stuck_reported:
                self._stuck_reported = False
                metrics.BATCH_STUCK.set(0)
                log.warning("the stuck gate batch returned: ready again")

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
            batch = self._take()
            self.metrics.queue_depth.set(len(self._queue))
            if not batch:
                continue
            self._running, self._arrived_while_running = True, False
            try:
                await self._run(batch)
            except Exception:  # a bug in this loop must not stop the service
                log.exception("batching loop failed on a batch of %d", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(RuntimeError("internal error while batching"))
            finally:
                self._running = False

    def _take(self) -> list[PendingImage]:
        """Up to ``max_batch_size`` live images from the queue; cancelled ones are skipped and those
        whose deadline has passed are answered :class:`DeadlineExceeded` without being computed."""
        batch: list[PendingImage] = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():  # the caller went away (cancelled): skip its image
                continue
            if item.deadline is not None and item.deadline <= now:
                metrics.DEADLINE_EXPIRED.labels(where="queued").inc()
                item.future.set_exception(
                    DeadlineExceeded(
                        f"the request's deadline passed after {time.perf_counter() - item.enqueued:.3f} s in "
                        "the queue; the image was dropped, not computed (send a longer X-Request-Timeout)"
                    )
                )
                continue
            batch.append(item)
        return batch

    async def _run(self, batch: list[PendingImage]) -> None:
        groups: dict[GroupKey, list[PendingImage]] = {}
        for item in batch:
            groups.setdefault(item.key, []).append(item)
        for key, items in groups.items():
            items = [item for item in items if not item.future.done()]  # gone while an earlier group ran
            if not items:
                continue
            started = time.perf_counter()
            waits = [started - item.enqueued for item in items]
            x = torch.stack([item.x for item in items])
            answers = await self._compute(x, key, waits)
            for item, answer in zip(items, answers, strict=True):
                if item.future.done():
                    continue
                if isinstance(answer, Row):
                    item.future.set_result(answer)
                else:
                    item.future.set_exception(answer)

    async def _call_gate(self, x: torch.Tensor, key: GroupKey) -> GateOutput:
        """One gate call on the worker thread; the watchdog sees how long it has been running."""
        loop = asyncio.get_running_loop()
        self._gate_started = time.monotonic()
        try:
            return await loop.run_in_executor(self._executor, self.run_batch, x, key)
        finally:
            self._gate_started = None

    async def _compute(self, x: torch.Tensor, key: GroupKey, waits: list[float]) -> list[Row | BaseException]:
        """One row or one exception per image of ``x``: a failed run of several images is split in two
        and each half retried, so a poisoned image (or one batch too large for memory) fails alone."""
        n = len(waits)
        try:
            out = await self._call_gate(x, key)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - whatever the gate raises stays with its images
            oom = is_out_of_memory(exc)
            metrics.GATE_FAILURES.labels(kind="out_of_memory" if oom else "error").inc()
            if oom and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            if n > 1:
                log.warning(
                    "gate failed on a batch of %d (%s: %s); retrying it in halves", n, type(exc).__name__, exc
                )
                half = n // 2
                return [
                    *await self._compute(x[:half], key, waits[:half]),
                    *await self._compute(x[half:], key, waits[half:]),
                ]
            if oom:
                log.error("gate ran out of memory on a single image: %s", exc)
                return [
                    OutOfMemory(
                        f"the gate ran out of memory on this image ({type(exc).__name__}); retry later"
                    )
                ]
            if not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt from the gate thread
                log.error("gate raised %s on one image", type(exc).__name__)
                return [RuntimeError(f"the gate raised {type(exc).__name__}")]
            log.error("gate failed on one image: %s: %s", type(exc).__name__, exc)
            return [exc]
        if len(out.prediction) != n:  # a bug of the batch function, not of an image: no retry
            error = RuntimeError(f"batch function returned {len(out.prediction)} rows for {n} images")
            return [error] * n
        self.metrics.batch_size.observe(n)
        for stage, seconds in out.seconds.items():
            metrics.STAGE_SECONDS.labels(stage=self.metrics.stage_prefix + stage).observe(seconds)
        return list(split_rows(out, waits))

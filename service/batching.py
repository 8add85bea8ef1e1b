"""Dynamic micro-batching in the shape of Ray Serve's ``@serve.batch``.

The batcher knows nothing of gates: ``Batcher[KeyT, ItemT, OutT]`` queues items under a group key,
collates each group's items into one batch, hands it to a batch function that returns an output with
one row per item (``len(output)``), and answers each caller with :class:`Batched` (that output, the
item's row index in it, its wait and the batch size). :mod:`service.gate_batches` plugs the gate in.

Three parts:

- :class:`Pending`, one waiting item with the future its caller awaits;
- a bounded queue (:class:`Batcher`): ``submit`` enqueues all of a request's items or none of them,
  and answers :class:`~service.errors.QueueFull` (HTTP 503) when they would not fit;
- one worker loop that takes up to ``max_batch_size`` images; it waits up to ``max_queue_delay`` for
  a batch to fill only while busy (work arrived while the last batch ran), so a lone request on an
  idle worker, or a closed-loop client's next request, starts at once, and batches form when work
  piles up; it groups them by key (for the gate: signal set, operating point,
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
from collections.abc import Callable, Hashable, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from prometheus_client import Gauge, Histogram

from service import metrics
from service.errors import BatchStuck, DeadlineExceeded, OutOfMemory, QueueFull, ShuttingDown

log = logging.getLogger("predgate.service")

KeyT = TypeVar("KeyT", bound=Hashable)
"""What makes two items computable in one run of the batch function."""
ItemT = TypeVar("ItemT")
"""One queued item (for the gate: one ``C x H x W`` image)."""
OutT = TypeVar("OutT", bound=Sized)
"""The batch function's output for a whole batch: ``len(OutT)`` rows, one per item, in order."""


@dataclass(frozen=True)
class Batched(Generic[OutT]):
    """One item's answer: the output of the batch it ran in, its row there, its wait before the batch
    started and the batch's size. The output is shared by the batch-mates, not copied per item."""

    output: OutT
    index: int
    queue_seconds: float
    batch_size: int


@dataclass(eq=False)  # compared by identity: the queue removes a given item, never an equal one
class Pending(Generic[KeyT, ItemT, OutT]):
    """One item waiting for its batch; ``deadline`` is a ``time.monotonic()`` instant after which its
    caller no longer wants the answer (None: no limit)."""

    item: ItemT
    key: KeyT
    future: asyncio.Future[Batched[OutT]]
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
    """Where a batcher reports its queue depth and batch sizes: the primary gate's batcher and the
    cascade's each have their own, so one queue's depth never overwrites the other's."""

    queue_depth: Gauge
    batch_size: Histogram


PRIMARY_METRICS = BatcherMetrics(metrics.QUEUE_DEPTH, metrics.BATCH_SIZE)
CASCADE_METRICS = BatcherMetrics(metrics.CASCADE_QUEUE_DEPTH, metrics.CASCADE_BATCH_SIZE)


class Batcher(Generic[KeyT, ItemT, OutT]):
    """Bounded queue plus one worker loop; see the module docstring.

    Parameters
    ----------
    run_batch : the batch function ``(batch, key) -> OutT`` (blocking; runs on a dedicated thread), where
        ``batch`` is ``collate`` of the group's items.
    collate : turns a group's items (in queue order) into the batch function's input.
    max_batch_size : most images taken from the queue per round.
    max_queue_delay_s : how long the loop waits, after the first image, for a batch to fill.
    queue_limit : most images waiting; ``submit`` beyond it raises :class:`QueueFull`.
    watchdog_s : a gate run longer than this counts as stuck (None: no watchdog).
    batcher_metrics : the queue-depth gauge and batch-size histogram it reports to.
    """

    def __init__(
        self,
        run_batch: Callable[[object, KeyT], OutT],
        *,
        collate: Callable[[list[ItemT]], object],
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
        self.collate = collate
        self.metrics = batcher_metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.queue_limit = queue_limit
        self.watchdog_s = watchdog_s
        self._gate_started: float | None = None  # time.monotonic() when the running gate call began
        self._watchdog: asyncio.Task[None] | None = None
        self._stuck_reported = False
        self._queue: deque[Pending[KeyT, ItemT, OutT]] = deque()
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
        self, items: Sequence[ItemT], key: KeyT, deadline: float | None = None
    ) -> list[asyncio.Future[Batched[OutT]]]:
        """Queue every one of ``items`` or none; one future per item, in order (a tensor's items are
        its rows, views that :func:`service.gate_batches.stack_rows` joins back without a copy).

        ``deadline`` (``time.monotonic()``): items still queued then are dropped, not computed. A
        future cancelled by its caller takes its item out of the queue."""
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
        n = len(items)
        if len(self._queue) + n > self.queue_limit:
            raise QueueFull(
                f"queue full: {len(self._queue)} images waiting, limit {self.queue_limit}; retry shortly"
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Batched[OutT]]] = []
        for i in range(n):
            future: asyncio.Future[Batched[OutT]] = loop.create_future()
            pending: Pending[KeyT, ItemT, OutT] = Pending(items[i], key, future, deadline=deadline)
            future.add_done_callback(self._withdraw_if_cancelled(pending))
            self._queue.append(pending)
            futures.append(future)
        self.metrics.queue_depth.set(len(self._queue))
        self._arrived_while_running = self._arrived_while_running or self._running
        self._wakeup.set()
        return futures

    def _withdraw_if_cancelled(
        self, item: Pending[KeyT, ItemT, OutT]
    ) -> Callable[[asyncio.Future[Batched[OutT]]], None]:
        def callback(future: asyncio.Future[Batched[OutT]]) -> None:
            if future.cancelled():
                try:
                    self._queue.remove(item)  # still queued: its place goes to the next request
                except ValueError:
                    return  # already taken into a batch, which skips it
                self.metrics.queue_depth.set(len(self._queue))

        return callback

    async def results(
        self, futures: list[asyncio.Future[Batched[OutT]]], deadline: float | None = None
    ) -> list[Batched[OutT]]:
        """The answers of ``futures`` (from :meth:`submit`), in order (the first image's exception, if
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
                    "gate batch running for %.1f s, over the watchdog limit of %g s: "
                    "not ready until it returns",
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

    def _take(self) -> list[Pending[KeyT, ItemT, OutT]]:
        """Up to ``max_batch_size`` live images from the queue; cancelled ones are skipped and those
        whose deadline has passed are answered :class:`DeadlineExceeded` without being computed."""
        batch: list[Pending[KeyT, ItemT, OutT]] = []
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

    async def _run(self, batch: list[Pending[KeyT, ItemT, OutT]]) -> None:
        groups: dict[KeyT, list[Pending[KeyT, ItemT, OutT]]] = {}
        for item in batch:
            groups.setdefault(item.key, []).append(item)
        for key, items in groups.items():
            items = [item for item in items if not item.future.done()]  # gone while an earlier group ran
            if not items:
                continue
            started = time.perf_counter()
            waits = [started - item.enqueued for item in items]
            answers = await self._compute([item.item for item in items], key, waits)
            for item, answer in zip(items, answers, strict=True):
                if item.future.done():
                    continue
                if isinstance(answer, Batched):
                    item.future.set_result(answer)
                else:
                    item.future.set_exception(answer)

    async def _call(self, items: list[ItemT], key: KeyT) -> OutT:
        """One batch-function call on the worker thread; the watchdog sees how long it has been running."""
        loop = asyncio.get_running_loop()
        self._gate_started = time.monotonic()
        try:
            batch = self.collate(items)
            return await loop.run_in_executor(self._executor, self.run_batch, batch, key)
        finally:
            self._gate_started = None

    async def _compute(
        self, items: list[ItemT], key: KeyT, waits: list[float]
    ) -> list[Batched[OutT] | BaseException]:
        """One answer or one exception per item: a failed run of several items is split in two and
        each half retried, so a poisoned image (or one batch too large for memory) fails alone."""
        n = len(waits)
        try:
            out = await self._call(items, key)
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
                    *await self._compute(items[:half], key, waits[:half]),
                    *await self._compute(items[half:], key, waits[half:]),
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
        if len(out) != n:  # a bug of the batch function, not of an image: no retry
            error = RuntimeError(f"batch function returned {len(out)} rows for {n} images")
            return [error] * n
        self.metrics.batch_size.observe(n)
        return answers_of(out, waits)


def answers_of(out: OutT, waits: list[float]) -> list[Batched[OutT]]:
    """One :class:`Batched` per row of ``out``, in batch order (all sharing ``out``)."""
    n = len(waits)
    return [Batched(out, i, wait, n) for i, wait in enumerate(waits)]

"""The gate as the batcher's batch function: what :mod:`service.batching` (which knows nothing of
gates) needs to run :meth:`models.gate.Gate.run` on a group of queued images.

- the group key is the request's :class:`~models.gate.GatePlan` (signal set and operating point
  resolved once, when the request arrives; plans compare by name);
- :func:`stack_rows` joins a group's images back into one ``N x C x H x W`` batch, as a view when they
  are consecutive rows of one request's tensor (a lone request, or a ``/predict/batch`` call): the
  images are decoded into one normalised batch once and never copied again on their way to the CNN;
- :class:`GateBatches` runs the gate, refuses non-finite outputs and reports the stage timings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.errors import InputError
from models.gate import Gate, GateOutput, GatePlan
from service import metrics
from service.batching import PRIMARY_METRICS, Batched, Batcher, BatcherMetrics

GateBatcher = Batcher[GatePlan, torch.Tensor, GateOutput]
"""The batcher of one gate: images (``C x H x W``) grouped by plan, answered by rows of a GateOutput."""
GateAnswer = Batched[GateOutput]
"""One image's answer: its row of the batch's gate output, with its wait and the batch size."""

NOT_FINITE = (
    "the model's output for this input is not finite (its values overflow inside the network); "
    "send a normalised image or tensor"
)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` fills exactly ``t.numel()`` consecutive elements (contiguous in some dimension
    order: channels first or, as decoded images are, channels last)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``N x C x H x W`` from ``N`` images of equal shape: a view when they are consecutive rows of
    one dense batch (the usual case: one request's decoded batch), else one stacked copy."""
    first = rows[0]
    if _dense(first):
        step = first.numel()
        storage = first.untyped_storage().data_ptr()
        offset = first.storage_offset()
        consecutive = all(
            row.shape == first.shape
            and row.stride() == first.stride()
            and row.dtype == first.dtype
            and row.untyped_storage().data_ptr() == storage
            and row.storage_offset() == offset + i * step
            for i, row in enumerate(rows)
        )
        if consecutive:
            return first.as_strided((len(rows), *first.shape), (step, *first.stride()), offset)
    return torch.stack(list(rows))


def run_gate(gate: Gate, x: torch.Tensor, plan: GatePlan) -> GateOutput:
    """``gate`` on one group; an output that is not finite raises :class:`InputError` for the whole
    batch, which the batcher then splits until the image responsible fails alone (422)."""
    try:
        out = gate.run(x, plan=plan)
    except ValueError as exc:  # scikit-learn refuses NaN / infinite evidence
        if "NaN" not in str(exc) and "infinity" not in str(exc):
            raise
        raise InputError(NOT_FINITE) from exc
    finite = np.isfinite(out.probabilities).all(axis=1) & np.isfinite(out.unified_score)
    if not finite.all():
        raise InputError(NOT_FINITE)
    return out


class GateBatches:
    """Batch function of one gate: runs it on a group and reports each stage's seconds under
    ``stage_prefix`` (the cascade's stages are ``cascade_forward``, ...).

    A batch of fewer than ``single_thread_below`` images runs on one torch intra-op thread, a larger
    one on all of them (``threads``, default: torch's count at start). A lone image cannot keep two
    threads busy: ResNet20 at batch 1 took 5.2 ms on two threads and 2.1 ms on one on a 2-core
    machine, while from 8 images on two threads win (``python -m bench.gate_threads``). Setting the
    count costs well under a microsecond; it is global to the process, and only gate threads change it.
    """

    def __init__(
        self, gate: Gate, stage_prefix: str = "", single_thread_below: int = 0, threads: int | None = None
    ) -> None:
        self.gate = gate
        self.stage_prefix = stage_prefix
        self.single_thread_below = single_thread_below
        self.threads = threads if threads is not None else torch.get_num_threads()

    def __call__(self, x: torch.Tensor, plan: GatePlan) -> GateOutput:
        torch.set_num_threads(1 if len(x) < self.single_thread_below else self.threads)
        out = run_gate(self.gate, x, plan)
        for stage, seconds in out.seconds.items():
            metrics.STAGE_SECONDS.labels(stage=self.stage_prefix + stage).observe(seconds)
        return out


def gate_batcher(
    gate: Gate,
    *,
    max_batch_size: int,
    max_queue_delay_s: float,
    queue_limit: int,
    watchdog_s: float | None = None,
    batcher_metrics: BatcherMetrics = PRIMARY_METRICS,
    stage_prefix: str = "",
    single_thread_below: int = 0,
) -> GateBatcher:
    """A batcher whose batch function is ``gate`` (see :class:`GateBatches`)."""
    return Batcher(
        GateBatches(gate, stage_prefix, single_thread_below),  # type: ignore[arg-type]
        collate=stack_rows,
        max_batch_size=max_batch_size,
        max_queue_delay_s=max_queue_delay_s,
        queue_limit=queue_limit,
        watchdog_s=watchdog_s,
        batcher_metrics=batcher_metrics,
    )

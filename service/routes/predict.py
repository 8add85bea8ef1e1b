"""``POST /predict`` and ``POST /predict/batch``: images in, predictions with verdicts out.

Both parse the body (:mod:`service.parsing`), resolve the signal set and operating point (unknown
names answer 422 before anything is queued), hand the images to the batcher and wait for their rows.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from models.errors import ConfigError
from models.gate import GateOutput, GatePlan
from service import metrics
from service.deps import BatcherDep, LoadedDep, SettingsDep, require_api_key
from service.errors import FallbackUnavailable
from service.explaining import explain_images
from service.fallback.outbox import NewItem
from service.fallback.store import FallbackStore
from service.gate_batches import GateAnswer
from service.parsing import ParsedRequest, parse_batch, parse_single
from service.schemas import (
    REQUEST_ERRORS,
    BatchJSON,
    CascadeOpinion,
    ClassProbability,
    DecidedBy,
    ExplainMode,
    Explanation,
    OperatingPointRef,
    Prediction,
    PredictJSON,
    PredictOptions,
    error_responses,
)
from service.settings import Settings
from service.state import LoadedService

log = logging.getLogger("predgate.service")

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

_ERRORS = error_responses(
    {
        **REQUEST_ERRORS,
        413: "body or image count over the limit",
        422: "unreadable input or unknown signal set / operating point",
        503: (
            "queue full, not ready, shutting down, a gate batch stuck past the watchdog, out of memory on a "
            "single image, or the fallback outbox could not store an unknown image (see Retry-After)"
        ),
        504: "the request's deadline (X-Request-Timeout) passed first; images still queued were not computed",
    }
)

IMAGE_MEDIA_TYPES = "image/png, image/jpeg"
REQUEST_HEADERS: list[dict[str, Any]] = [
    {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "description": "echoed in the X-Request-ID response header and the body's request_id "
        "when it is a plain token (letters, digits, '._:-', at most 128), else replaced by a fresh id",
        "schema": {"type": "string"},
    },
    {
        "name": "X-Request-Timeout",
        "in": "header",
        "required": False,
        "description": "seconds this request may take (default: the server's request_timeout_s, "
        "at most 3600); when it passes the answer is 504 deadline_exceeded and images still queued "
        "are not computed; "
        "400 when it is not a positive number",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 1.7976931348623157e308},
    },
]


def _body_doc(json_model: type[PredictOptions], file_field: str, many: bool) -> dict[str, Any]:
    """The request body as the parser reads it (the served document adds the bundle's tensor shape and
    names, and the image encodings: :mod:`service.openapi`)."""
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    if many:
        file_schema = {"type": "array", "items": file_schema, "minItems": 1}
    raw_image = {"schema": {"type": "string", "format": "binary"}}
    return {
        "parameters": REQUEST_HEADERS,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": json_model.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [file_field],
                        "additionalProperties": False,
                        "properties": {
                            file_field: file_schema,
                            "signal_set": {"type": "string"},
                            "operating_point": {"type": "string"},
                            "full_evidence": {"type": "boolean"},
                            "return_conductance": {"type": "boolean"},
                            "top_k": {"type": "integer", "minimum": 1, "maximum": 1000},
                            "explain": {"type": "string", "enum": ["none", "unknown", "all"]},
                        },
                    },
                    "encoding": {file_field: {"contentType": IMAGE_MEDIA_TYPES}},
                },
                **({} if many else {"image/png": raw_image, "image/jpeg": raw_image}),
            },
        },
    }


def query_options(
    signal_set: Annotated[
        str | None, Query(min_length=1, description="signal set that makes the verdict")
    ] = None,
    operating_point: Annotated[
        str | None, Query(min_length=1, description="operating point of that set")
    ] = None,
    full_evidence: Annotated[
        bool | None, Query(description="conductance vector and LCR whatever the set")
    ] = None,
    return_conductance: Annotated[bool | None, Query(description="return the conductance vector")] = None,
    top_k: Annotated[int | None, Query(ge=1, le=1000, description="top classes to list (default 3)")] = None,
    explain: Annotated[
        ExplainMode | None,
        Query(description="answers that carry an explanation: none, unknown or all (default: the server's)"),
    ] = None,
) -> PredictOptions:
    return PredictOptions(
        signal_set=signal_set,
        operating_point=operating_point,
        full_evidence=full_evidence,
        return_conductance=return_conductance,
        top_k=top_k,
        explain=explain,
    )


QueryOptions = Annotated[PredictOptions, Depends(query_options)]


def _merge(query: PredictOptions, body: PredictOptions) -> PredictOptions:
    """Body values win over query values; unset ones stay None."""
    data = query.model_dump()
    data.update({k: v for k, v in body.model_dump().items() if v is not None})
    return PredictOptions(**data)


def _check_names(loaded: LoadedService, options: PredictOptions) -> None:
    """Every name given must exist, even one a body value overrides (an unknown ``?operating_point=``
    would otherwise pass unseen): ConfigError (422) naming what is stored."""
    if options.signal_set is not None:
        loaded.gate.signal_set(options.signal_set)
    if options.operating_point is not None:
        points = loaded.gate.point_names
        if options.operating_point not in points:
            raise ConfigError(
                f"unknown operating point {options.operating_point!r}; stored: {sorted(points)}"
            )


def resolve_plan(loaded: LoadedService, settings: Settings, options: PredictOptions) -> GatePlan:
    """Request names, else the server's settings, else the bundle's defaults, resolved once into the
    plan the gate runs; unknown names raise ``ConfigError`` (422) here, before anything is queued."""
    full = bool(options.full_evidence) or bool(options.return_conductance)
    return loaded.gate.plan(
        options.signal_set or settings.signal_set, options.operating_point or settings.operating_point, full
    )


def _top_k(probs: np.ndarray, names: list[str], top_k: int | None) -> list[ClassProbability]:
    k = min(top_k or 3, len(probs))
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        ClassProbability(label=int(i), class_name=names[int(i)], probability=float(probs[i])) for i in order
    ]


def _optional(values: np.ndarray | None, i: int) -> float | None:
    return None if values is None else float(values[i])


def _timings_ms(answer: GateAnswer, **extra: float) -> dict[str, float]:
    seconds = {"queue": answer.queue_seconds, **answer.output.seconds, **extra}
    return {stage: 1000.0 * s for stage, s in seconds.items()}


def _point_ref(out: GateOutput) -> OperatingPointRef:
    return OperatingPointRef(name=out.operating_point.name, threshold=out.operating_point.threshold)


def _opinion(answer: GateAnswer, names: list[str], bundle_id: str) -> CascadeOpinion:
    """The cascade gate's answer as the nested ``cascade`` field of an answer."""
    out, i = answer.output, answer.index
    label = int(out.prediction[i])
    return CascadeOpinion(
        label=label,
        class_name=names[label],
        probabilities=out.probabilities[i].tolist(),
        conductance_score=_optional(out.cond_score, i),
        lcr=_optional(out.lcr, i),
        unified_score=float(out.unified_score[i]),
        verdict=out.verdict(i),
        signal_set=out.signal_set,
        operating_point=_point_ref(out),
        bundle_id=bundle_id,
        timings_ms=_timings_ms(answer),
        batch_size=answer.batch_size,
    )


def _decided_by(answer: GateAnswer, second: GateAnswer | None) -> DecidedBy:
    if not answer.output.reject[answer.index]:
        return "primary"
    return "cascade" if second is not None and not second.output.reject[second.index] else "none"


def _record(
    answer: GateAnswer,
    loaded: LoadedService,
    options: PredictOptions,
    total_s: float,
    request_id: str,
    second: GateAnswer | None = None,
) -> Prediction:
    """The answer for one image from its primary row and, where the primary rejected and a cascade
    ran, the cascade's row (``second``): label, top classes and verdict follow whoever decided."""
    names = loaded.bundle.class_names
    out, i = answer.output, answer.index
    decided_by = _decided_by(answer, second)
    decider = second if decided_by == "cascade" and second is not None else answer
    label = int(decider.output.prediction[decider.index])
    want_vector = bool(options.full_evidence) or bool(options.return_conductance)
    cascade = loaded.cascade
    mutants = None if out.mutants_used is None else int(out.mutants_used[i])
    return Prediction(
        label=label,
        class_name=names[label],
        top_k=_top_k(decider.output.probabilities[decider.index], names, options.top_k),
        probabilities=out.probabilities[i].tolist(),
        primary_label=int(out.prediction[i]),
        decided_by=decided_by,
        cascade=_opinion(second, names, cascade.bundle_id)
        if second is not None and cascade is not None
        else None,
        conductance_score=_optional(out.cond_score, i),
        lcr=_optional(out.lcr, i),
        mutants_used=mutants,
        unified_score=float(out.unified_score[i]),
        verdict="unknown" if decided_by == "none" else "accept",
        signal_set=out.signal_set,
        operating_point=_point_ref(out),
        bundle_id=loaded.bundle_id,
        timings_ms=_timings_ms(answer, total=total_s),
        batch_size=answer.batch_size,
        request_id=request_id,
        conductance=out.conductance[i].tolist() if want_vector and out.conductance is not None else None,
    )


def _observe(answer: GateAnswer, class_name: str, total_s: float) -> None:
    out, i = answer.output, answer.index
    metrics.PREDICTIONS.labels(verdict=out.verdict(i), class_name=class_name, signal_set=out.signal_set).inc()
    metrics.STAGE_SECONDS.labels(stage="queue").observe(answer.queue_seconds)
    metrics.STAGE_SECONDS.labels(stage="total").observe(total_s)
    metrics.UNIFIED_SCORE.labels(signal_set=out.signal_set).observe(float(out.unified_score[i]))
    if out.lcr is not None:
        metrics.LCR.labels(signal_set=out.signal_set).observe(float(out.lcr[i]))


async def _answer(
    parsed: ParsedRequest,
    query: PredictOptions,
    loaded: LoadedService,
    settings: Settings,
    batcher: Any,
    started: float,
    request: Request,
) -> list[Prediction]:
    _check_names(loaded, query)
    _check_names(loaded, parsed.options)
    options = _merge(query, parsed.options)
    plan = resolve_plan(loaded, settings, options)
    x: torch.Tensor = parsed.x
    context = request.scope.get("state", {})  # request id and deadline, set by RequestContextMiddleware
    deadline = context.get("deadline")
    answers: list[GateAnswer] = await batcher.results(batcher.submit(x, plan, deadline=deadline), deadline)
    seconds = await _cascade_answers(request, loaded, x, answers, deadline)
    total = time.perf_counter() - started
    records = []
    names = loaded.bundle.class_names
    for answer, second in zip(answers, seconds, strict=True):
        _observe(answer, names[int(answer.output.prediction[answer.index])], total)
        record = _record(answer, loaded, options, total, str(context.get("request_id", "")), second)
        metrics.DECISIONS.labels(decided_by=record.decided_by).inc()
        records.append(record)
    loaded.drift.observe(
        plan.set_name,
        np.array([a.output.unified_score[a.index] for a in answers]),
        np.array([a.output.reject[a.index] for a in answers]),
    )
    outbox = request.app.state.predgate.outbox
    mode = options.explain or settings.explain
    wanted = [
        i for i, r in enumerate(records) if mode == "all" or (mode == "unknown" and r.verdict == "unknown")
    ]
    for_fallback = (
        [i for i, r in enumerate(records) if r.verdict == "unknown"]
        if outbox is not None and settings.fallback_explain
        else []
    )
    explanations = await _explanations(loaded, settings, x, sorted({*wanted, *for_fallback}))
    for i in wanted:
        records[i].explanation = explanations.get(i)
    if outbox is not None:
        await _hand_to_fallback(
            request, outbox, parsed, records, explanations if settings.fallback_explain else None
        )
    return records


async def _explanations(
    loaded: LoadedService, settings: Settings, x: torch.Tensor, indices: list[int]
) -> dict[int, Explanation]:
    """Explanations of the images at ``indices`` (one batched computation, off the event loop), by index.

    An explanation is evidence for a person, not part of the verdict: if computing it fails, the
    answers (and their fallback items) still go out, without it, and the failure is logged.
    """
    if not indices:
        return {}
    try:
        found = await explain_images(loaded, x[indices], settings.explain_method, settings.explain_top_k_maps)
    except Exception:
        log.exception("explanation of %d image(s) failed; answering without", len(indices))
        metrics.EXPLANATION_FAILURES.inc()
        return {}
    return dict(zip(indices, found, strict=True))


async def _cascade_answers(
    request: Request,
    loaded: LoadedService,
    x: torch.Tensor,
    answers: list[GateAnswer],
    deadline: float | None,
) -> list[GateAnswer | None]:
    """The cascade gate's answer for every image the primary rejected (None elsewhere, and everywhere
    without a cascade): through the cascade's own batcher, off the event loop, within the request's
    deadline (past it: 504, as for the primary)."""
    cascade = loaded.cascade
    rejected = [i for i, a in enumerate(answers) if a.output.reject[a.index]]
    out: list[GateAnswer | None] = [None] * len(answers)
    if cascade is None or not rejected:
        return out
    batcher = request.app.state.predgate.cascade_batcher
    x_second = cascade.inputs(x[rejected])
    second = await batcher.results(batcher.submit(x_second, cascade.plan, deadline=deadline), deadline)
    for i, answer in zip(rejected, second, strict=True):
        out[i] = answer
    return out


async def _hand_to_fallback(
    request: Request,
    outbox: FallbackStore,
    parsed: ParsedRequest,
    records: list[Prediction],
    explanations: dict[int, Explanation] | None = None,
) -> None:
    """Store a fallback item for every ``unknown`` image, durably, before the answer leaves: if that fails
    the request is answered 503 (retry) rather than with an ``unknown`` nobody will ever see. With
    ``explanations`` (the ``fallback_explain`` setting), each item's meta carries its image's explanation
    for the reviewer (null where it could not be computed)."""
    unknown = [i for i, record in enumerate(records) if record.verdict == "unknown"]
    if not unknown:
        return
    items = [
        NewItem(
            {
                "request_id": records[i].request_id,
                "index": i,
                "bundle_id": records[i].bundle_id,
                "prediction": records[i].model_dump(exclude={"timings_ms", "fallback_item", "explanation"}),
                **(
                    {}
                    if explanations is None
                    else {"explanation": explanations[i].model_dump() if i in explanations else None}
                ),
            },
            *parsed.original(i),
        )
        for i in unknown
    ]
    try:
        keys = await run_in_threadpool(outbox.enqueue, items)
    except Exception as exc:  # disk full, read-only volume, database locked past its timeout, Redis gone
        log.exception("fallback outbox write failed")
        metrics.FALLBACK_ENQUEUE_FAILURES.inc()
        raise FallbackUnavailable(
            "the fallback outbox could not store this request's unknown image(s) "
            f"({type(exc).__name__}); retry"
        ) from None
    metrics.FALLBACK_ENQUEUED.inc(len(keys))
    for i, item_key in zip(unknown, keys, strict=True):
        records[i].fallback_item = item_key
    delivery = request.app.state.predgate.delivery
    if delivery is not None:
        delivery.wake()


@router.post(
    "/predict",
    response_model=Prediction,
    responses=_ERRORS,
    openapi_extra=_body_doc(PredictJSON, "file", many=False),
    summary="Predict one image, with the gate's verdict",
)
async def predict(
    request: Request, loaded: LoadedDep, settings: SettingsDep, batcher: BatcherDep, query: QueryOptions
) -> Prediction:
    """One PNG/JPEG (multipart field ``file``, base64 in JSON ``image``, or a raw image body) or a
    normalised tensor (JSON ``tensor``); options as query parameters or body fields."""
    started = time.perf_counter()
    parsed = await parse_single(request, loaded)
    return (await _answer(parsed, query, loaded, settings, batcher, started, request))[0]


@router.post(
    "/predict/batch",
    response_model=list[Prediction],
    responses=_ERRORS,
    openapi_extra=_body_doc(BatchJSON, "files", many=True),
    summary="Predict several images in one call (answers in order)",
)
async def predict_batch(
    request: Request, loaded: LoadedDep, settings: SettingsDep, batcher: BatcherDep, query: QueryOptions
) -> list[Prediction]:
    """Up to ``max_images_per_request`` images: JSON ``images`` (base64) or ``tensors``, or multipart
    ``files``."""
    started = time.perf_counter()
    parsed = await parse_batch(request, loaded, settings.max_images_per_request)
    return await _answer(parsed, query, loaded, settings, batcher, started, request)

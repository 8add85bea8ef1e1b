"""``POST /explain``: one image in, the reviewer's explanation out (attribution overlay, top feature maps).

The body takes the same forms as ``POST /predict`` (:func:`service.parsing.parse_single`: multipart
``file``, JSON ``image`` or ``tensor``, a raw PNG/JPEG); the options are query parameters. The
explanation does not go through the batcher: it makes its own passes through a private copy of the
CNN on a worker thread (:mod:`service.explaining`), so the gate's batches are never held up by it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from models.errors import InputError
from service.deps import LoadedDep, SettingsDep, require_api_key
from service.errors import DeadlineExceeded
from service.explaining import explain_images
from service.parsing import parse_single
from service.routes.predict import IMAGE_MEDIA_TYPES, REQUEST_HEADERS
from service.schemas import REQUEST_ERRORS, ExplainJSON, ExplainMethod, Explanation, error_responses

router = APIRouter(tags=["explain"], dependencies=[Depends(require_api_key)])

_ERRORS = error_responses(
    {
        **REQUEST_ERRORS,
        413: "body over the limit",
        422: "unreadable input, an unknown method, or a body option (options are query parameters here)",
        503: "not ready yet or shutting down (see Retry-After)",
        504: "the request's deadline (X-Request-Timeout) passed before the explanation started",
    }
)

_RAW_IMAGE = {"schema": {"type": "string", "format": "binary"}}
_BODY_DOC: dict[str, Any] = {
    "parameters": REQUEST_HEADERS,
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ExplainJSON.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {"file": {"type": "string", "format": "binary"}},
                },
                "encoding": {"file": {"contentType": IMAGE_MEDIA_TYPES}},
            },
            "image/png": _RAW_IMAGE,
            "image/jpeg": _RAW_IMAGE,
        },
    },
}


@router.post(
    "/explain",
    response_model=Explanation,
    responses=_ERRORS,
    openapi_extra=_BODY_DOC,
    summary="Explain the CNN's prediction for one image (overlay PNG, top feature maps by conductance)",
)
async def explain(
    request: Request,
    loaded: LoadedDep,
    settings: SettingsDep,
    method: Annotated[
        ExplainMethod | None,
        Query(
            description="saliency, integrated_gradients or grad_cam (default: the server's explain_method)"
        ),
    ] = None,
    top_k_maps: Annotated[
        int | None, Query(ge=1, le=1000, description="feature maps per class (default: explain_top_k_maps)")
    ] = None,
) -> Explanation:
    """The attribution map of the predicted class as an overlay PNG, and the conductance layer's top
    feature maps for the predicted class and the runner-up."""
    started = time.perf_counter()
    parsed = await parse_single(request, loaded)
    given = sorted(parsed.options.model_dump(exclude_none=True))
    if given:
        raise InputError(
            f"/explain takes no prediction options in the body (got {given}); its options, method and "
            "top_k_maps, are query parameters"
        )
    deadline = request.scope.get("state", {}).get("deadline")  # set by RequestContextMiddleware
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the request's deadline passed before its explanation started; not computed")
    (found,) = await explain_images(
        loaded, parsed.x, method or settings.explain_method, top_k_maps or settings.explain_top_k_maps
    )
    found.timings_ms["total"] = 1000.0 * (time.perf_counter() - started)
    return found

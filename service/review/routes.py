"""The review page and its API: people label the inputs the gate rejected.

``GET /review`` renders the waiting items (server-side HTML, one small script that PUTs the label);
``GET /review/items`` and ``GET /review/items/{key}`` are the same data as JSON; ``PUT
/review/items/{key}/label`` records a label; ``GET /review/export`` gives the reviewed items as Label
Studio tasks and ``GET /review/export/label-config`` the project config they fit.

Access: with API keys configured, a bearer key, or HTTP Basic with an API key as the password (a
browser cannot send a bearer token when it loads a page; it asks for Basic credentials and resends
them with the script's requests). The Basic user name is recorded as the reviewer.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image
from starlette.concurrency import run_in_threadpool

from models.errors import InputError
from service.deps import LoadedDep, StateDep
from service.errors import NotFound, ReviewUnauthorized
from service.fallback.reviews import ReviewStore, StoredItem
from service.review.label_studio import NONE_OF_THESE, labelling_config, task
from service.review.schemas import RejectionEstimate, ReviewedLabel, ReviewItem, ReviewLabel, ReviewQueue
from service.schemas import error_responses
from service.state import LoadedService

HERE = Path(__file__).resolve().parent
PAGE = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
SCRIPT = HERE / "static" / "review.js"
NPY = "application/x-npy"

_ERRORS = error_responses(
    {
        401: "API keys are set and neither a bearer key nor Basic password matched",
        404: "the review page is off (PREDGATE_REVIEW), or no such item",
        422: "a label that is not a class of the bundle, or a malformed body",
    }
)

_bearer = HTTPBearer(auto_error=False)
_basic = HTTPBasic(auto_error=False, realm="predgate review")


@dataclass(frozen=True)
class Reviewer:
    """Who is reviewing: the Basic user name, when the browser sent one."""

    name: str | None
    store: ReviewStore
    settle: bool


def require_reviewer(
    state: StateDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    basic: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
) -> Reviewer:
    if not state.settings.review or state.reviews is None:
        raise NotFound("the review page is off: start the server with PREDGATE_REVIEW=1")
    name = basic.username.strip() or None if basic is not None else None
    if state.keys.enabled:
        token = bearer.credentials if bearer is not None else basic.password if basic is not None else None
        if token is None or state.keys.match(token) is None:
            raise ReviewUnauthorized(
                "the review page needs an API key: as a bearer token, or as the Basic password"
            )
    return Reviewer(name, state.reviews, settle=state.settings.fallback_url is None)


ReviewerDep = Annotated[Reviewer, Depends(require_reviewer)]
router = APIRouter(prefix="/review", tags=["review"], responses=_ERRORS)


def _class_name(label: int | None, class_names: list[str]) -> str:
    return NONE_OF_THESE if label is None else class_names[label]


def _as_response(item: StoredItem, class_names: list[str]) -> ReviewItem:
    review = None
    if item.reviewed:
        assert item.reviewed_at is not None
        review = ReviewedLabel(
            label=item.label,
            class_name=_class_name(item.label, class_names),
            reviewer=item.reviewer,
            reviewed_at=item.reviewed_at,
        )
    return ReviewItem(
        key=item.key,
        created_at=item.created_at,
        delivery_state=item.state,
        request_id=item.meta.get("request_id"),
        bundle_id=item.meta.get("bundle_id"),
        image_url=f"/review/items/{item.key}/image",
        prediction=item.meta.get("prediction", {}),
        explanation=item.meta.get("explanation"),
        review=review,
    )


def _queue(store: ReviewStore, loaded: LoadedService, limit: int, offset: int) -> ReviewQueue:
    names = list(loaded.bundle.class_names)
    counts = store.counts()
    return ReviewQueue(
        waiting=counts.waiting,
        reviewed=counts.reviewed,
        none_of_these=counts.none_of_these,
        class_names=names,
        estimate=RejectionEstimate(**asdict(store.estimate())),
        items=[_as_response(item, names) for item in store.waiting(limit, offset)],
    )


def _png(pixels: np.ndarray) -> bytes:
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _viewable(data: bytes, media_type: str, loaded: LoadedService) -> tuple[bytes, str]:
    """PNG and JPEG as received; a tensor (.npy) de-normalised with the bundle's statistics into a PNG."""
    if media_type != NPY:
        return data, media_type
    try:
        tensor = np.load(io.BytesIO(data), allow_pickle=False)
        return _png(loaded.bundle.normalisation.invert(tensor)), "image/png"
    except ValueError as exc:
        raise InputError(f"the stored tensor cannot be shown as an image: {exc}") from exc


@router.get("", response_class=HTMLResponse, include_in_schema=False)
async def review_page(
    request: Request,
    reviewer: ReviewerDep,
    loaded: LoadedDep,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> HTMLResponse:
    settings = request.app.state.predgate.settings
    queue = await run_in_threadpool(_queue, reviewer.store, loaded, settings.review_page_size, offset)
    html = PAGE.get_template("review.html").render(
        base=request.scope.get("root_path", ""), bundle_id=loaded.bundle_id, **queue.model_dump()
    )
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


@router.get("/static/review.js", include_in_schema=False)
async def review_script() -> FileResponse:
    return FileResponse(SCRIPT, media_type="text/javascript")


@router.get("/items", response_model=ReviewQueue, summary="Rejected inputs waiting for review, oldest first")
async def waiting_items(
    reviewer: ReviewerDep,
    loaded: LoadedDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ReviewQueue:
    return await run_in_threadpool(_queue, reviewer.store, loaded, limit, offset)


@router.get("/items/{key}", response_model=ReviewItem, summary="One stored item, with its review")
async def one_item(key: str, reviewer: ReviewerDep, loaded: LoadedDep) -> ReviewItem:
    item = await run_in_threadpool(reviewer.store.get, key)
    if item is None:
        raise NotFound(f"no outbox item with key {key!r}")
    return _as_response(item, list(loaded.bundle.class_names))


@router.get(
    "/items/{key}/image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "the input as received"}},
    summary="The input as received (a tensor is shown de-normalised, as PNG)",
)
async def item_image(key: str, reviewer: ReviewerDep, loaded: LoadedDep) -> Response:
    stored = await run_in_threadpool(reviewer.store.image, key)
    if stored is None:
        raise NotFound(f"no outbox item with key {key!r}")
    data, media_type = await run_in_threadpool(_viewable, *stored, loaded)
    return Response(data, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})


@router.put(
    "/items/{key}/label",
    response_model=ReviewItem,
    responses=error_responses({400: "the body is not JSON"}),
    summary="Record (or correct) what an item really is",
)
async def label_item(key: str, body: ReviewLabel, reviewer: ReviewerDep, loaded: LoadedDep) -> ReviewItem:
    names = list(loaded.bundle.class_names)
    if await run_in_threadpool(reviewer.store.get, key) is None:
        raise NotFound(f"no outbox item with key {key!r}")
    if body.label is not None and body.label >= len(names):
        raise InputError(f"label {body.label} is not a class of the bundle (0..{len(names) - 1}: {names})")
    item = await run_in_threadpool(
        reviewer.store.record, key, body.label, body.reviewer or reviewer.name, settle=reviewer.settle
    )
    if item is None:
        raise NotFound(f"no outbox item with key {key!r}")
    return _as_response(item, names)


def _export(store: ReviewStore, loaded: LoadedService) -> list[dict[str, Any]]:
    """Every reviewed item as a task, its image one that Label Studio can show (tensors as PNG)."""
    names = list(loaded.bundle.class_names)
    tasks = []
    for item in store.reviewed():
        stored = store.image(item.key)
        assert stored is not None  # a review references its item (foreign key, same transaction)
        tasks.append(task(item, *_viewable(*stored, loaded), names))
    return tasks


@router.get(
    "/export",
    summary="Reviewed items as Label Studio tasks (JSON import format)",
    response_model=list[dict[str, Any]],
)
async def export_reviews(reviewer: ReviewerDep, loaded: LoadedDep) -> JSONResponse:
    tasks = await run_in_threadpool(_export, reviewer.store, loaded)
    return JSONResponse(
        tasks, headers={"Content-Disposition": 'attachment; filename="predgate-reviews.json"'}
    )


@router.get(
    "/export/label-config",
    response_class=Response,
    responses={200: {"content": {"application/xml": {}}, "description": "Label Studio labelling config"}},
    summary="The Label Studio labelling config the exported tasks fit",
)
async def export_label_config(reviewer: ReviewerDep, loaded: LoadedDep) -> Response:
    return Response(labelling_config(list(loaded.bundle.class_names)), media_type="application/xml")

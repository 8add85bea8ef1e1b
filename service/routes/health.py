"""Liveness and readiness probes (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import StateDep
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    responses={
        503: {"model": Health, "description": "a gate batch stuck past liveness_stuck_s: restart the replica"}
    },
    summary="The process is alive and no gate batch is stuck past the liveness limit",
)
async def healthz(state: StateDep) -> JSONResponse:
    reason = state.not_alive_because()
    if reason is None:
        return JSONResponse(Health().model_dump(exclude_none=True), status_code=200)
    return JSONResponse(Health(status="stuck", detail=reason).model_dump(), status_code=503)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": (
                "bundle not loaded or not warmed up, shutting down, or a gate batch stuck past the watchdog"
            ),
        }
    },
    summary="The bundle is loaded and warmed up, and no gate batch is stuck",
)
async def readyz(state: StateDep) -> JSONResponse:
    reason = state.not_ready_because()
    if reason is None and state.loaded is not None:
        body = Readiness(ready=True, bundle_id=state.loaded.bundle_id, detail="bundle loaded and warmed up")
        return JSONResponse(body.model_dump(), status_code=200)
    return JSONResponse(Readiness(ready=False, detail=reason or "not ready").model_dump(), status_code=503)

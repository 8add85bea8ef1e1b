"""Dependencies of the routes, as ``Annotated`` aliases; tests override these, never globals."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import retry_after_s
from service.errors import NotReady, RateLimited, Unauthorized
from service.gate_batches import GateBatcher
from service.settings import Settings
from service.state import LoadedService, ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.predgate  # type: ignore[no-any-return]


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_app_settings(state: StateDep) -> Settings:
    """The settings the app was created with (``create_app(settings)``)."""
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_loaded(state: StateDep) -> LoadedService:
    """The loaded bundle and gate; 503 until the service is ready."""
    if not state.ready or state.loaded is None:
        raise NotReady("the service is not ready yet (bundle loading or warming up)")
    return state.loaded


LoadedDep = Annotated[LoadedService, Depends(get_loaded)]


def get_batcher(state: StateDep) -> GateBatcher:
    if not state.ready or state.batcher is None:
        raise NotReady("the service is not ready yet (bundle loading or warming up)")
    return state.batcher


BatcherDep = Annotated[GateBatcher, Depends(get_batcher)]

_bearer = HTTPBearer(auto_error=False, description="required when the server has API keys")


def require_api_key(
    state: StateDep,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With API keys set (``api_key``, ``api_keys``), the request needs ``Authorization: Bearer <key>``
    for one of them (constant-time check, see :mod:`service.auth`); with ``rate_limit_per_s`` set, each
    key (or client address, without keys) gets a token bucket and an empty one answers 429."""
    identity: bytes | str | None = None
    if state.keys.enabled:
        if credentials is None:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <api key>'")
        identity = state.keys.match(credentials.credentials)
        if identity is None:
            raise Unauthorized("invalid bearer token")
    limiter = state.rate_limiter
    if limiter is None:
        return
    if identity is None:
        identity = request.client.host if request.client is not None else "unknown"
    wait = limiter.take(identity)
    if wait > 0:
        per = "API key" if state.keys.enabled else "client address"
        raise RateLimited(
            f"rate limit of {limiter.rate:g} requests/s (burst {limiter.burst}) per {per} exceeded; "
            f"retry in {wait:.2f} s",
            retry_after_s(wait),
        )

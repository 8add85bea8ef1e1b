"""Dependencies of the routes, as ``Annotated`` aliases; tests override these, never globals."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.batching import Batcher
from service.errors import NotReady, Unauthorized
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


def get_batcher(state: StateDep) -> Batcher:
    if not state.ready or state.batcher is None:
        raise NotReady("the service is not ready yet (bundle loading or warming up)")
    return state.batcher


BatcherDep = Annotated[Batcher, Depends(get_batcher)]

_bearer = HTTPBearer(auto_error=False, description="required when the server has an API key")


def require_api_key(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """With ``api_key`` set, the request needs ``Authorization: Bearer <api_key>`` (constant-time check)."""
    if settings.api_key is None:
        return
    if credentials is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <api key>'")
    expected = settings.api_key.get_secret_value().encode()
    if not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise Unauthorized("invalid bearer token")

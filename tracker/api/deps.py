"""Request dependencies: the settings, the calling client; one database transaction per request."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from tracker.api.errors import VALIDATION_ERROR, ApiError
from tracker.config import Settings
from tracker.db.engine import transaction
from tracker.db.models import Client
from tracker.tracking.clients import KeyCache, authenticate


async def get_app_settings(request: Request) -> Settings:
    """The app's settings (async: no I/O, so no hop to the thread pool)."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer <api key>`; keys come from `tracker clients create`.",
)


@contextmanager
def request_transaction(request: Request) -> Iterator[Session]:
    """The request's transaction, in one hop to a worker thread; committed before the answer.

    A failed commit is a 500, never a false 201
    (docs/decisions/0010-three-api-request-threads.md).
    """
    sessions: sessionmaker[Session] = request.app.state.sessions
    with transaction(sessions) as session:
        yield session


async def current_client(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Client:
    """The client whose API key the request carries; 401 `invalid_api_key` otherwise.

    Checked before the body is validated: a caller without a valid key learns nothing
    more. A key seen recently is answered from the app's `KeyCache` on the event loop;
    any other is looked up in a short read of its own, in a worker thread. The client
    comes back detached (its columns loaded).
    """
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "invalid_api_key",
            "Authorization: missing; send `Authorization: Bearer <api key>` with the key "
            "`tracker clients create` printed",
            headers=challenge,
        )
    api_key = credentials.credentials
    keys: KeyCache = request.app.state.key_cache
    client = keys.get(api_key)
    if client is None:
        client = await run_in_threadpool(_look_up_client, request.app.state.sessions, api_key)
        if client is not None:
            keys.put(api_key, client)
    if client is None:
        raise ApiError(
            401,
            "invalid_api_key",
            "Authorization: the API key is not valid; check it, or create a client with "
            "`tracker clients create`",
            headers=challenge,
        )
    return client


def _look_up_client(sessions: sessionmaker[Session], api_key: str) -> Client | None:
    with sessions() as session:
        return authenticate(session, api_key)


CurrentClient = Annotated[Client, Depends(current_client)]

_declared_queries: dict[int, frozenset[str]] = {}


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _declared_query_names(route: APIRoute) -> frozenset[str]:
    names = _declared_queries.get(id(route))
    if names is None:
        names = frozenset(_query_names(route.dependant))
        _declared_queries[id(route)] = names
    return names


async def known_query_parameters(request: Request, _client: CurrentClient) -> None:
    """422 for a query parameter the route does not take: a mistyped filter
    (`?stauts=failed`) would otherwise be ignored and list everything. Checked after the
    API key, so a caller without one learns nothing more."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    declared = _declared_query_names(route)
    unknown = sorted(set(request.query_params) - declared)
    if unknown:
        allowed = ", ".join(sorted(declared)) or "none"
        raise ApiError(
            422,
            VALIDATION_ERROR,
            f"{unknown[0][:80]}: is not a query parameter of this route (it takes: {allowed})",
        )

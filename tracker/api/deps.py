"""Request dependencies: one database transaction per request, the settings, the calling client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from tracker.api.errors import ApiError
from tracker.clients import authenticate
from tracker.config import Settings
from tracker.models import Client


def get_db(request: Request) -> Iterator[Session]:
    """A session in a transaction per request: committed if the route returns, else rolled back.

    Scoped to the route function (see `SessionDep`), so the commit happens
    before the answer is sent: a failed commit is a 500, never a false 201.
    """
    sessions: sessionmaker[Session] = request.app.state.sessions
    with sessions() as session, session.begin():
        yield session


SessionDep = Annotated[Session, Depends(get_db, scope="function")]


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


def current_client(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Client:
    """The client whose API key the request carries; 401 `invalid_api_key` otherwise."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "invalid_api_key",
            "Authorization: missing; send `Authorization: Bearer <api key>` with the key "
            "`tracker clients create` printed",
            headers=challenge,
        )
    client = authenticate(session, credentials.credentials)
    if client is None:
        raise ApiError(
            401,
            "invalid_api_key",
            "Authorization: the API key is not valid; check it, or create a client with "
            "`tracker clients create`",
            headers=challenge,
        )
    return client


CurrentClient = Annotated[Client, Depends(current_client)]

"""`/v1/client`: the calling client's own settings (registration defaults, operations URL)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tracker.api.deps import CurrentClient, bearer_scheme, request_transaction
from tracker.api.errors import error_responses
from tracker.api.resources import ClientSettingsResource
from tracker.db.models import Client
from tracker.tracking.clients import KeyCache, client_settings, update_client_settings
from tracker.tracking.schemas import CallbackUrl, EventName, check_callback_url

router = APIRouter(prefix="/v1/client", tags=["client"], responses=error_responses(401, 500))


class ClientSettingsPatch(BaseModel):
    """The settings to change; a field left out is kept, `null` unsets it."""

    model_config = ConfigDict(extra="forbid")

    default_callback_url: CallbackUrl | None = Field(
        None, description="http(s) URL, vetted like callback_url."
    )
    default_events: list[EventName] | None = Field(
        None, description="Subset of task.running, task.completed, task.failed, task.timed_out."
    )
    operations_url: CallbackUrl | None = Field(
        None, description="http(s) URL for operational events, vetted like callback_url."
    )

    @field_validator("default_callback_url", "operations_url", mode="before")
    @classmethod
    def _check_url(cls, value: Any) -> Any:
        """The URL's own problems first, said plainly; then the pattern applies."""
        return check_callback_url(value)


@router.get("", response_model=ClientSettingsResource, summary="Show the client's settings")
def show(request: Request, client: CurrentClient) -> dict[str, Any]:
    """`default_callback_url`, `default_events` and `operations_url`."""
    with request_transaction(request) as session:
        fresh = session.get(Client, client.id)
        assert fresh is not None  # clients are never deleted
        return client_settings(fresh)


@router.patch(
    "",
    response_model=ClientSettingsResource,
    summary="Change the client's settings",
    responses=error_responses(400, 422),
)
def change(
    changes: ClientSettingsPatch,
    request: Request,
    client: CurrentClient,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> dict[str, Any]:
    """Set the fields given; `null` unsets one. Registrations that leave `callback_url` or
    `events` out take the defaults from then on (on other API processes, within the minute
    their cache of API keys keeps a client)."""
    with request_transaction(request) as session:
        updated = update_client_settings(
            session, client.id, changes.model_dump(include=changes.model_fields_set)
        )
        body = client_settings(updated)
    if credentials is not None:  # this process's next request of the client sees them at once
        keys: KeyCache = request.app.state.key_cache
        keys.put(credentials.credentials, updated)
    return body

"""`/v1/services`: the AceData task services this tracker knows, and what each reports.

A service not listed is tracked too, by the rules that hold for every service
(docs/architecture.md#from-a-record-to-a-state); its tasks say `"profile": "generic"`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from tracker.api.deps import CurrentClient
from tracker.api.errors import error_responses
from tracker.api.resources import ServicePage
from tracker.profiles import service_listing

router = APIRouter(prefix="/v1/services", tags=["services"], responses=error_responses(401, 500))


@router.get("", response_model=ServicePage, summary="List the services and their profiles")
def list_services(client: CurrentClient) -> dict[str, Any]:
    """Each service's name, its task endpoint, whether it reports progress, and the kinds
    of artifact its tasks' `outputs` hold."""
    return {"items": service_listing()}

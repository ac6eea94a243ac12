"""Probes and metrics, without authentication: `/healthz`, `/readyz`, `/metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from tracker.api.resources import Health, Readiness
from tracker.clock import isoformat_z, utcnow
from tracker.config import Settings
from tracker.db.models import Client, UpstreamCredential
from tracker.db.queries import database_levels
from tracker.observability import metrics
from tracker.upstream.budget import credential_key

OK = "ok"
# Readiness must answer quickly, also when a dependency hangs.
BROKER_TIMEOUT_SECONDS = 2.0

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> dict[str, Any]:
    """Always 200 while the process serves requests.

    Answered on the event loop (async, no I/O): a sync route would wait for one of the
    few request threads, and a liveness probe must not fail because they are all busy
    with slow work.
    """
    return {"status": OK}


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def check_database(sessions: sessionmaker[Session]) -> str:
    """`ok` if the database answers a query, else why not."""
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        return f"unreachable: {_first_line(exc)}"
    return OK


def check_broker(url: str, *, timeout: float = BROKER_TIMEOUT_SECONDS) -> str:
    """`ok` if the Celery broker accepts a connection within `timeout`, else why not."""
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=timeout) as connection:  # type: ignore[no-untyped-call]
            connection.ensure_connection(
                max_retries=1, timeout=timeout, interval_start=0, interval_step=0
            )
    except Exception as exc:
        return f"unreachable: {_first_line(exc)}"
    return OK


def check_upstream_credentials(sessions: sessionmaker[Session], settings: Settings) -> str:
    """`ok` unless the upstream rejected the configured token (recorded by the pollers)."""
    token = settings.upstream_bearer
    try:
        with sessions() as session:
            row = session.execute(
                select(UpstreamCredential.rejected_at, UpstreamCredential.rejected_reason).where(
                    UpstreamCredential.key == credential_key(token)
                )
            ).first()
    except Exception as exc:
        return f"unknown: {type(exc).__name__}"
    if row is None or row.rejected_at is None:
        return OK
    return (
        f"rejected by the upstream at {isoformat_z(row.rejected_at)} ({row.rejected_reason}); "
        "set a valid TRACKER_UPSTREAM_TOKEN"
    )


def client_token_problems(sessions: sessionmaker[Session]) -> dict[str, str]:
    """Per client whose own upstream token the upstream rejects: since when and why.

    Detail only: such a client's polling pauses and its tasks say why, while every
    other client is served, so the tracker stays ready.
    """
    try:
        with sessions() as session:
            rows = session.execute(
                select(
                    Client.name, UpstreamCredential.rejected_at, UpstreamCredential.rejected_reason
                )
                .join(UpstreamCredential, UpstreamCredential.key == Client.upstream_credential)
                .where(UpstreamCredential.rejected_at.is_not(None))
                .order_by(Client.name)
            ).all()
    except Exception as exc:
        return {"clients": f"unknown: {type(exc).__name__}"}
    return {
        f"client {row.name}": (
            f"upstream token rejected at {isoformat_z(row.rejected_at)} ({row.rejected_reason}); "
            f"its tasks are not polled until `tracker clients set-upstream-token {row.name}` "
            "sets a valid one"
        )
        for row in rows
    }


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Database and broker reachable, upstream token not rejected",
    responses={503: {"model": Readiness, "description": "Not ready; `checks` says why."}},
)
def readyz(request: Request) -> JSONResponse:
    """200 when every dependency is fine, 503 with the reasons otherwise."""
    settings: Settings = request.app.state.settings
    sessions: sessionmaker[Session] = request.app.state.sessions
    checks = {
        "database": check_database(sessions),
        "broker": check_broker(settings.effective_broker_url),
        "upstream_credentials": check_upstream_credentials(sessions, settings),
    }
    ready = all(result == OK for result in checks.values())
    body = {
        "status": "ready" if ready else "unready",
        "checks": checks,
        "detail": client_token_problems(sessions),
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics_text(request: Request) -> Response:
    """This process's counters (every process's, on a shared host) and the database levels."""
    sessions: sessionmaker[Session] = request.app.state.sessions

    def read_levels() -> metrics.DatabaseLevels:
        with sessions() as session:
            return database_levels(session, now=utcnow())

    return Response(metrics.render(read_levels), media_type=CONTENT_TYPE_LATEST)

"""Clients' own AceData tokens: stored encrypted, used for that client's polls with a budget of
their own, a shared id still asked once, and a rejected token pausing only its client."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from tests.support.sim import SimulatorHandle
from tracker.cli.app import app as cli
from tracker.clock import utcnow
from tracker.config import Settings, get_settings
from tracker.db import engine as db
from tracker.db.engine import session_factory
from tracker.db.models import Client, Task
from tracker.errors import TokenUnavailable
from tracker.observability.logs import SecretMask
from tracker.polling import ClaimedTask, PollBatch, plan_batches
from tracker.tracking.clients import NewClient, create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration
from tracker.upstream.budget import credential_key
from tracker.upstream.credentials import (
    client_credential,
    reencrypt_client_tokens,
    set_client_token,
)
from tracker.worker.jobs import claim_and_plan
from tracker.worker.pollers import WorkerContext, poll_with_tokens

OLD_KEY = Fernet.generate_key().decode()
NEW_KEY = Fernet.generate_key().decode()
TRACKER_TOKEN = "tracker-token-0001"
OWN_TOKEN = "acme-own-token-0002"


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return settings.model_copy(update={"secret_key": _secret(OLD_KEY)})


def _secret(value: str) -> object:
    from pydantic import SecretStr

    return SecretStr(value)


def test_a_token_is_stored_encrypted_and_decrypts_only_with_the_key(
    session: Session, keyed: Settings, client: NewClient
) -> None:
    credential = set_client_token(session, client.client, f"  {OWN_TOKEN}\n", settings=keyed)
    session.commit()
    stored = session.scalar(select(Client).where(Client.id == client.client.id))
    assert stored is not None
    assert stored.upstream_token_ciphertext is not None
    assert OWN_TOKEN not in stored.upstream_token_ciphertext
    assert credential == stored.upstream_credential == credential_key(OWN_TOKEN)
    assert client_credential(stored, settings=keyed).token == OWN_TOKEN
    other_key = keyed.model_copy(update={"secret_key": _secret(NEW_KEY)})
    with pytest.raises(TokenUnavailable, match="no key of TRACKER_SECRET_KEY decrypts"):
        client_credential(stored, settings=other_key)
    unset = keyed.model_copy(update={"secret_key": None})
    with pytest.raises(TokenUnavailable, match="TRACKER_SECRET_KEY is not set"):
        client_credential(stored, settings=unset)


def test_rotating_the_secret_key_keeps_every_token(
    session: Session, keyed: Settings, client: NewClient
) -> None:
    set_client_token(session, client.client, OWN_TOKEN, settings=keyed)
    both = keyed.model_copy(update={"secret_key": _secret(f"{NEW_KEY},{OLD_KEY}")})
    assert client_credential(client.client, settings=both).token == OWN_TOKEN  # old decrypts
    assert reencrypt_client_tokens(session, settings=both) == 1
    only_new = keyed.model_copy(update={"secret_key": _secret(NEW_KEY)})
    assert client_credential(client.client, settings=only_new).token == OWN_TOKEN


def test_a_decrypted_token_is_masked_in_every_log_line(
    session: Session, keyed: Settings, client: NewClient
) -> None:
    set_client_token(session, client.client, OWN_TOKEN, settings=keyed)
    client_credential(client.client, settings=keyed)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretMask())
    logger = logging.getLogger("tests.tokens")
    logger.addHandler(handler)
    try:
        logger.warning("upstream said no to %s", OWN_TOKEN)
    finally:
        logger.removeHandler(handler)
    assert OWN_TOKEN not in stream.getvalue()
    assert "[redacted]" in stream.getvalue()


@pytest.fixture
def shell(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("TRACKER_DATABASE_URL", db_url)
    monkeypatch.setenv("TRACKER_SECRET_KEY", OLD_KEY)
    get_settings.cache_clear()
    db.get_engine.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()
    db.get_engine.cache_clear()


def test_the_cli_reads_the_token_from_stdin_and_never_prints_it(
    shell: CliRunner, session: Session, client: NewClient, keyed: Settings
) -> None:
    result = shell.invoke(
        cli,
        ["clients", "set-upstream-token", "acme"],
        input=OWN_TOKEN + "\n",
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert OWN_TOKEN not in result.output
    session.expire_all()
    stored = session.scalar(select(Client).where(Client.name == "acme"))
    assert stored is not None
    assert client_credential(stored, settings=keyed).token == OWN_TOKEN
    session.rollback()  # SQLite: let the command write
    listing = shell.invoke(cli, ["clients", "list"], env={"COLUMNS": "200"})
    assert "own" in listing.output
    assert OWN_TOKEN not in listing.output

    assert listing.exit_code == 0, listing.output
    empty = shell.invoke(cli, ["clients", "set-upstream-token", "acme"], input="\n")
    assert empty.exit_code == 2
    assert "empty" in empty.output

    cleared = shell.invoke(cli, ["clients", "set-upstream-token", "acme", "--clear"])
    assert cleared.exit_code == 0, cleared.output
    session.expire_all()
    stored = session.scalar(select(Client).where(Client.name == "acme"))
    assert stored is not None
    assert stored.upstream_token_ciphertext is None


def test_without_a_secret_key_the_cli_stores_nothing_and_says_how_to_make_one(
    shell: CliRunner, monkeypatch: pytest.MonkeyPatch, session: Session, client: NewClient
) -> None:
    monkeypatch.delenv("TRACKER_SECRET_KEY")
    get_settings.cache_clear()
    result = shell.invoke(cli, ["clients", "set-upstream-token", "acme"], input=OWN_TOKEN)
    assert result.exit_code == 1
    assert "TRACKER_SECRET_KEY is not set" in result.output
    assert "Fernet.generate_key" in result.output
    session.expire_all()
    stored = session.scalar(select(Client).where(Client.name == "acme"))
    assert stored is not None
    assert stored.upstream_token_ciphertext is None


def test_a_shared_id_is_asked_once_with_a_token_that_is_not_paused() -> None:
    now = utcnow()
    claims = [
        ClaimedTask("luma", "shared", now, credential="tok_a"),
        ClaimedTask("luma", "mine", now, credential="tok_a"),
        ClaimedTask("luma", "shared", now, credential="tok_b"),
        ClaimedTask("luma", "theirs", now, credential="tok_b"),
    ]
    assert plan_batches(claims, 50) == [
        PollBatch("luma", ("shared", "mine"), credential="tok_a"),
        PollBatch("luma", ("theirs",), credential="tok_b"),
    ]
    paused = plan_batches(claims, 50, paused={"tok_a"}, probing={"tok_a"})
    assert paused == [
        PollBatch("luma", ("shared", "theirs"), credential="tok_b"),
        PollBatch("luma", ("mine",), probe=True, credential="tok_a"),
    ]


def _register(session: Session, owner: NewClient, task_id: str, settings: Settings) -> Task:
    return register_task(
        session, owner.client, TaskRegistration(task_id=task_id), settings=settings
    ).task


def _poll_once(ctx: WorkerContext) -> list[PollBatch]:
    batches = claim_and_plan(ctx, utcnow() + timedelta(seconds=1))
    for _ in poll_with_tokens(ctx, batches):
        pass
    return batches


def _states(session: Session) -> dict[str, str]:
    session.expire_all()
    return {row[0]: row[1] for row in session.execute(select(Task.task_id, Task.state))}


def test_each_client_is_polled_with_its_own_token_and_a_shared_id_once(
    session: Session, engine: Engine, keyed: Settings, simulator: SimulatorHandle
) -> None:
    """The simulator accepts only the client's own token: its tasks complete, and the
    tracker's token (rejected) holds back only the others'."""
    settings = keyed.model_copy(
        update={"upstream_url": simulator.url, "upstream_token": _secret(TRACKER_TOKEN)}
    )
    simulator.configure(tokens=[OWN_TOKEN])
    own, shared, theirs = simulator.seed([{"outcome": "completed", "duration": 0}] * 3)
    acme, globex = create_client(session, "acme"), create_client(session, "globex")
    set_client_token(session, acme.client, OWN_TOKEN, settings=settings)
    _register(session, acme, own, settings)
    _register(session, acme, shared, settings)
    _register(session, globex, shared, settings)
    _register(session, globex, theirs, settings)
    session.commit()

    ctx = WorkerContext.create(settings, session_factory(engine))
    batches = _poll_once(ctx)
    assert sorted((b.credential, sorted(b.task_ids)) for b in batches) == sorted(
        [
            (credential_key(OWN_TOKEN), sorted([own, shared])),
            (credential_key(TRACKER_TOKEN), [theirs]),
        ]
    )
    stats = simulator.stats()
    assert stats["requests_by_action"] == {"retrieve_batch": 2}  # one request per token
    assert stats["items_requested"] == 2  # own and shared, the shared id once (theirs: 401)
    states = session.execute(
        select(Client.name, Task.task_id, Task.state).join(Client, Client.id == Task.client_id)
    ).all()
    assert sorted(states) == sorted(
        [
            ("acme", own, "completed"),
            ("acme", shared, "completed"),
            ("globex", shared, "completed"),  # the one answer serves both registrations
            ("globex", theirs, "pending"),  # the tracker's token was refused
        ]
    )


def test_a_revoked_client_token_pauses_only_that_client(
    session: Session,
    engine: Engine,
    keyed: Settings,
    simulator: SimulatorHandle,
) -> None:
    settings = keyed.model_copy(
        update={"upstream_url": simulator.url, "upstream_token": _secret(TRACKER_TOKEN)}
    )
    simulator.configure(tokens=[TRACKER_TOKEN])  # acme's own token is revoked
    mine, theirs = simulator.seed([{"outcome": "completed", "duration": 0}] * 2)
    acme, globex = create_client(session, "acme"), create_client(session, "globex")
    set_client_token(session, acme.client, OWN_TOKEN, settings=settings)
    _register(session, acme, mine, settings)
    _register(session, globex, theirs, settings)
    session.commit()

    ctx = WorkerContext.create(settings, session_factory(engine))
    _poll_once(ctx)
    assert _states(session) == {mine: "pending", theirs: "completed"}

    # The next ticks do not ask with the rejected token (one probe per max poll interval).
    requests_before = simulator.stats()["requests"]
    _register(session, acme, "another", settings)
    session.commit()
    assert _poll_once(ctx) == []
    assert simulator.stats()["requests"] == requests_before

    api = TestClient(_app(settings))
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.json()  # the tracker serves every other client
    detail = ready.json()["detail"]
    assert list(detail) == ["client acme"]
    assert "set-upstream-token acme" in detail["client acme"]
    assert OWN_TOKEN not in ready.text

    # Past their deadline, acme's tasks say why; globex's are untouched.
    from tracker.polling import time_out_overdue_tasks

    later = utcnow() + timedelta(seconds=settings.task_timeout + 1)
    time_out_overdue_tasks(session, now=later, settings=settings)
    session.commit()
    session.expire_all()
    failures = {row[0]: row[1] for row in session.execute(select(Task.task_id, Task.failure_code))}
    assert failures == {
        mine: "upstream_token_rejected",
        "another": "upstream_token_rejected",
        theirs: None,
    }


def _app(settings: Settings) -> object:
    from tracker.api import create_app

    return create_app(settings)

"""API keys: the cache of checked keys, and what it spares the database."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from tracker.tracking.clients import KeyCache, NewClient, authenticate, create_client

HOOK = "https://hooks.example.com/tracker"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_cached_key_is_answered_until_its_time_is_up(session: Session) -> None:
    new = create_client(session, "acme")
    session.commit()
    clock = Clock()
    keys = KeyCache(ttl=60, clock=clock)
    client = authenticate(session, new.api_key)
    assert client is not None
    assert keys.get(new.api_key) is None

    keys.put(new.api_key, client)
    clock.now += 59.9
    cached = keys.get(new.api_key)
    clock.now += 0.1
    expired = keys.get(new.api_key)

    assert cached is not None
    assert cached.id == new.client.id
    assert expired is None
    assert keys.get(new.api_key[:-1] + "x") is None  # another key, even a near one


def test_the_cache_keeps_at_most_its_size_dropping_the_oldest(session: Session) -> None:
    made = [create_client(session, f"client-{n}") for n in range(3)]
    session.commit()
    keys = KeyCache(size=2)
    for new in made:
        client = authenticate(session, new.api_key)
        assert client is not None
        keys.put(new.api_key, client)

    assert keys.get(made[0].api_key) is None
    assert [keys.get(new.api_key) is not None for new in made[1:]] == [True, True]


def test_a_known_key_costs_no_read_of_the_clients(
    api: TestClient, client: NewClient, engine: Engine
) -> None:
    bind = api.app.state.sessions.kw["bind"]  # type: ignore[attr-defined]
    lookups: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "FROM clients" in statement:
            lookups.append(statement)

    event.listen(bind, "before_cursor_execute", count)
    try:
        answers = [
            api.post(
                "/v1/tasks",
                json={"task_id": f"t{n}", "callback_url": HOOK},
                headers={"Authorization": f"Bearer {client.api_key}"},
            )
            for n in range(3)
        ]
        refused = [
            api.post(
                "/v1/tasks",
                json={"task_id": "t9", "callback_url": HOOK},
                headers={"Authorization": "Bearer trk_not-a-key"},
            )
            for _ in range(2)
        ]
    finally:
        event.remove(bind, "before_cursor_execute", count)

    assert [a.status_code for a in answers] == [201, 201, 201]
    assert [a.status_code for a in refused] == [401, 401]
    # One read for the good key, then none; a bad key is read every time (never cached).
    assert len(lookups) == 3

"""Each webhook attempt stands alone: nothing a receiver sets travels to a later request.

Against a real receiver on loopback that sets cookies, through the worker's own pooled
HTTP session (the process-wide one `send_webhook` uses when given none).
"""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.integration.test_delivery import completed_delivery
from tests.support.receiver import Receiver, Reply
from tracker.config import Settings
from tracker.delivery.attempt import attempt_delivery
from tracker.delivery.sender import http_session
from tracker.tracking.clients import NewClient, create_client

COOKIES = {
    "Set-Cookie": "session=receiver-set; Path=/; Max-Age=3600",
    "Set-Cookie2": 'legacy="1"; Version="1"; Path="/"',
}


def test_no_cookie_a_receiver_sets_is_sent_back_to_it_by_any_client(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    other = create_client(session, "other-client")
    session.commit()
    receiver.script("/hook", Reply(200, headers=COOKIES), Reply(503, headers=COOKIES))
    deliveries = [
        completed_delivery(session, client, settings, receiver.url("/hook"), task_id="first"),
        completed_delivery(session, client, settings, receiver.url("/hook"), task_id="second"),
        completed_delivery(session, other, settings, receiver.url("/hook"), task_id="third"),
    ]

    for delivery_id in deliveries:
        attempt_delivery(engine, delivery_id, settings=settings)

    requests = receiver.wait_for(3)
    assert [r.reply.status for r in requests if r.reply] == [200, 503, 200]
    assert [r.headers.get("cookie") for r in requests] == [None, None, None]
    assert [r.headers.get("cookie2") for r in requests] == [None, None, None]
    assert len(http_session().cookies) == 0


def test_keep_alive_stays_and_a_connection_serves_only_its_own_vetted_address(
    engine: Engine, session: Session, settings: Settings, client: NewClient
) -> None:
    """Pooling is kept (two webhooks to one receiver share a connection, even across the
    cookie it set), and a connection never serves another address."""
    first, second = Receiver(), Receiver()
    first.script("/hook", Reply(200, headers=COOKIES))
    try:
        urls = [first.url(), first.url(), second.url(), second.url()]
        for n, url in enumerate(urls):
            delivery_id = completed_delivery(session, client, settings, url, task_id=f"t-{n}")
            assert attempt_delivery(engine, delivery_id, settings=settings).status == "succeeded"

        one, two = [[r.peer for r in receiver.requests] for receiver in (first, second)]
        assert len(set(one)) == len(set(two)) == 1  # each pair on one kept-alive connection
        assert set(one).isdisjoint(two)
        assert [r.headers.get("cookie") for r in first.requests] == [None, None]
    finally:
        first.close()
        second.close()


def test_bytes_a_receiver_sends_beyond_its_answer_never_answer_a_later_request(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    """An answer followed by a second, unasked-for one (kept on a pooled connection, it
    would answer the next webhook): the next webhook gets its own answer."""
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    receiver.script("/hook", Reply(200, trailing=smuggled), Reply(500))
    first = completed_delivery(session, client, settings, receiver.url("/hook"), task_id="a")
    second = completed_delivery(session, client, settings, receiver.url("/hook"), task_id="b")

    assert attempt_delivery(engine, first, settings=settings).status == "succeeded"
    outcome = attempt_delivery(engine, second, settings=settings)

    assert len(receiver.wait_for(2)) == 2
    assert outcome.status == "pending"
    assert outcome.status_code == 500

"""The test receiver counts as answered only what a sender was there to read."""

from __future__ import annotations

import socket
import time

from tests.support.receiver import Receiver, Reply

REQUEST = (
    b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
    b"Content-Type: application/json\r\n\r\n{}"
)


def test_an_answer_read_by_the_sender_is_answered() -> None:
    receiver = Receiver()
    receiver.default_reply = Reply(delay=0.2)
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sender:
            sender.sendall(REQUEST)
            answer = b""
            while not answer.endswith(b"\r\n\r\nok"):  # all of it, as HTTP clients read
                answer += sender.recv(1000)
            assert answer.startswith(b"HTTP/1.1 200")
        (request,) = receiver.requests
        # The server thread notes the answer just after writing it: give it a moment.
        deadline = time.monotonic() + 2
        while not request.answered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(request.answered) == 1
        time.sleep(0.1)  # the sender's orderly close has been read
        assert request.unread == []
    finally:
        receiver.close()


def test_an_answer_the_sender_never_read_is_marked_unread() -> None:
    """A sender killed after the answer arrived but before it read it: its socket closes
    with the answer unread, so its kernel resets the connection, and the answer reached
    nobody (the kill's teardown takes some milliseconds, long enough for writes to land)."""
    receiver = Receiver()
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sender:
            sender.sendall(REQUEST)
            (request,) = receiver.wait_for(1)
            deadline = time.monotonic() + 2
            while not request.answered and time.monotonic() < deadline:
                time.sleep(0.01)
            assert request.answered
            time.sleep(0.05)  # the answer sits in the sender's receive buffer, unread
        deadline = time.monotonic() + 2
        while not request.unread and time.monotonic() < deadline:
            time.sleep(0.01)
        assert request.unread
    finally:
        receiver.close()


def test_a_request_whose_sender_died_before_the_answer_is_not_answered() -> None:
    """A killed worker's request must not count as acknowledged: nobody read the answer.

    The sender's end arrives (FIN) but its reset does not: writing the answer would
    succeed, as it does under load when the reset comes late."""
    receiver = Receiver()
    receiver.default_reply = Reply(delay=0.2)
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sender:
            sender.sendall(REQUEST)
            receiver.wait_for(1)
            sender.shutdown(socket.SHUT_WR)
            time.sleep(0.5)  # the delay is over: the answer was written, or not
            (request,) = receiver.requests
            assert request.answered == []
    finally:
        receiver.close()

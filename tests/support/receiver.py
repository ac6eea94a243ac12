"""A real webhook receiver on loopback for tests: scripted answers, every request recorded.

    receiver = Receiver()                    # listens on 127.0.0.1, a free port
    receiver.script("/hook", Reply(500), Reply(500), Reply(200))
    url = receiver.url("/hook")              # http://127.0.0.1:<port>/hook
    ...
    receiver.requests                        # [Received(method, path, headers, body, at)]
    receiver.close()

Each path answers its scripted replies in order, then `default_reply` (200) for ever;
each recorded request keeps the reply it got. `Receiver(port=N)` listens on a
given port, so a receiver closed and opened again is "the same" to a sender.
A reply can wait before answering (`delay`, give or take `jitter`) or drip its
status line one byte at a time (`drip`), or write more than its Content-Length
(`trailing`), to play slow and hostile receivers. `Receiver(tls=context)`
serves https with the context's certificate.
"""

from __future__ import annotations

import random
import select
import socket
import ssl
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    # The listen backlog of real web servers (nginx 511, uvicorn 2048), not socketserver's
    # 5: a worker opening its sending threads' connections at once would otherwise see
    # the overflow's handshakes dropped, and each such request start a second late (the
    # client's SYN retransmission).
    request_queue_size = 1024
    daemon_threads = True


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0  # seconds to wait before answering (ended early by close())
    jitter: float = 0.0  # the delay varies by up to this much either way, request by request
    drip: float = 0.0  # seconds between bytes of the status line, if > 0
    trailing: bytes = b""  # written after the body, beyond its Content-Length


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it; `headers` has lower-case names."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when the request was read
    reply: Reply | None = None  # the answer chosen for it
    # The sender's (address, port): requests on one kept-alive connection share it.
    peer: tuple[str, int] | None = None
    # When that answer was written in full (time.monotonic()); empty if it never was.
    answered: list[float] = field(default_factory=list, compare=False)
    # When the sender's end reset the connection with that answer unread (its process
    # died, or closed the socket, before reading it: see `Handler.handle`); empty if not.
    unread: list[float] = field(default_factory=list, compare=False)


class Receiver:
    """A threaded HTTP server on 127.0.0.1 that answers as scripted and records requests."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.requests: list[Received] = []
        # Answered once the scripts are used up; fault tests swap it to play a slow receiver.
        self.default_reply = Reply()
        self._scripts: defaultdict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", port), self._handler_class())
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port: int = self._server.server_address[1]
        # A short poll interval makes close() quick: shutdown waits for the next poll.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/hook", *, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def script(self, path: str, *replies: Reply) -> None:
        """Queue answers for `path`, used in order before the default 200."""
        with self._lock:
            self._scripts[path].extend(replies)

    def requests_to(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, count: int, *, timeout: float = 5.0) -> list[Received]:
        """Block until `count` requests arrived (any path); all of them so far."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(
                    f"expected {count} requests within {timeout} s, got {len(self.requests)}"
                )
            return list(self.requests)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def _next_reply(self, path: str) -> Reply:
        with self._lock:
            queue = self._scripts.get(path)
            return queue.popleft() if queue else self.default_reply

    def _record(self, request: Received) -> None:
        with self._arrived:
            self.requests.append(request)
            self._arrived.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do
            last_answered: Received | None = None  # on this connection
            # Headers and body go out in two writes: without this, Nagle's algorithm and
            # the client's delayed ACK add 40 ms to every answer.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                if receiver._closing.is_set():
                    # Closed: a kept-alive connection must not outlive the server.
                    self.close_connection = True
                    return
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                reply = receiver._next_reply(self.path)
                request = Received(
                    "POST",
                    self.path,
                    {name.lower(): value for name, value in self.headers.items()},
                    body,
                    time.monotonic(),
                    reply,
                    (str(self.client_address[0]), int(self.client_address[1])),
                )
                receiver._record(request)
                if self._answer(reply):
                    request.answered.append(time.monotonic())
                    self.last_answered = request

            def handle(self) -> None:
                """Serve the connection's requests; note an answer the sender never read.

                A socket closed with received data still unread is reset (RST), not closed
                in order (FIN): that is how a sender killed before reading its answer (an
                answer written while its process was being torn down, say) shows up here,
                as a reset where the next request or the end would be read.
                """
                self.last_answered = None
                try:
                    super().handle()
                except ConnectionResetError:
                    if self.last_answered is not None:
                        self.last_answered.unread.append(time.monotonic())

            def _answer(self, reply: Reply) -> bool:
                """Write the answer; False if it was not written in full."""
                delay = reply.delay + random.uniform(-reply.jitter, reply.jitter)
                if delay > 0 and receiver._closing.wait(delay):
                    self.close_connection = True
                    return False
                if self._sender_gone():
                    # Written now, the answer would reach nobody (under load the sender's
                    # reset can come too late for the write to fail): not an answer.
                    self.close_connection = True
                    return False
                if reply.drip:
                    for byte in f"HTTP/1.1 {reply.status} Slow\r\n".encode():
                        if receiver._closing.wait(reply.drip):
                            return False
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    self.close_connection = True
                    return False
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body + reply.trailing)
                    self.wfile.flush()
                except OSError:  # the sender gave up and closed the connection
                    self.close_connection = True
                    return False
                return True

            def _sender_gone(self) -> bool:
                """Whether the sender hung up (or died) while its request waited for the answer.

                A sender waiting for its answer sends nothing more, so anything readable
                on the connection now is its end: EOF or a reset.
                """
                connection = self.connection
                if isinstance(connection, ssl.SSLSocket):  # no peeking under TLS; not needed
                    return False
                try:
                    readable, _, _ = select.select([connection], [], [], 0)
                    return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:  # reset
                    return True

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output clean

        return Handler

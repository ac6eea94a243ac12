"""The SSRF guard: webhooks go only to public addresses, and to the very address vetted.

`vet_callback` resolves a callback URL's host and refuses it if *any* address
it resolves to is not public (loopback, private, link-local, multicast,
reserved, unspecified, carrier-grade NAT, or an IPv6 form of any of these,
including IPv4 addresses embedded in IPv6). The request then connects to the
vetted address itself (`PinnedAddressAdapter`): the URL carries the IP, the
`Host` header and, for https, SNI and certificate verification carry the
hostname. A second DNS answer (rebinding) therefore cannot redirect it.

`AttemptDeadline` bounds the whole attempt: socket timeouts apply to each
read, so a receiver dripping one byte at a time could otherwise hold a worker
thread for ever; at the deadline the attempt's connections are shut down (one
watchdog thread per process keeps every attempt's deadline).
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from requests import PreparedRequest
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from tracker.errors import CallbackRefused, ForbiddenAddress, UnresolvableHost
from tracker.tracking.schemas import parse_callback_url

if TYPE_CHECKING:
    from requests.adapters import _HostParams, _PoolKwargs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (hostname, port) -> the addresses it resolves to, as strings. Injectable for tests.
Resolver = Callable[[str, int], Sequence[str]]

ALLOW_PRIVATE_HINT = (
    "webhooks go only to public addresses; use a public URL, or set "
    "TRACKER_WEBHOOK_ALLOW_PRIVATE=true for development"
)

_CARRIER_GRADE_NAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


@dataclass(frozen=True)
class VettedTarget:
    """Where one attempt may connect: the vetted addresses, in the resolver's order."""

    scheme: str
    port: int
    path: str  # with the query, if any
    addresses: tuple[str, ...]
    host_header: str  # the original host[:port], sent as `Host` and used for TLS
    auth: tuple[str, str] | None  # user:password from the callback URL, if any

    def url_for(self, address: str) -> str:
        """The callback URL with `address` in place of the host name."""
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def system_resolver(hostname: str, port: int) -> list[str]:
    """Every address the system resolver gives for `hostname`, in its order, without repeats."""
    infos = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, NAT64, Teredo)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64_WELL_KNOWN or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def forbidden_reason(address: IPAddress) -> str | None:
    """Why `address` is not a public destination ("loopback", "private", ...), or None."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = forbidden_reason(embedded)
            if inner is not None:
                return f"{inner} (IPv4 {embedded} inside IPv6)"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("carrier-grade NAT", address in _CARRIER_GRADE_NAT),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("not globally routable", not address.is_global),
    )
    return next((name for name, applies in checks if applies), None)


def vet_callback(url: str, *, allow_private: bool, resolver: Resolver) -> VettedTarget:
    """Resolve and check the callback URL's host; the address to connect to.

    Raises `ForbiddenAddress` if any resolved address is not public (unless
    `allow_private`), `CallbackRefused` for a URL that cannot be sent to, and
    `UnresolvableHost` when DNS has no answer.
    """
    try:
        parts = parse_callback_url(url)
    except CallbackRefused as exc:
        raise CallbackRefused(f"callback URL {exc.message}") from None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    hostname = parts.hostname or ""
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(hostname)]
    except ValueError:
        try:
            answer = resolver(hostname, port)
        except OSError as exc:
            raise UnresolvableHost(f"could not resolve {hostname!r}: {exc}") from None
        # The system resolver may add an IPv6 zone ("fe80::1%eth0"); the address is what counts.
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in answer]
    if not addresses:
        raise UnresolvableHost(f"{hostname!r} resolves to no address")
    if not allow_private:
        for address in addresses:
            reason = forbidden_reason(address)
            if reason is not None:
                raise ForbiddenAddress(
                    f"callback host {hostname!r} resolves to {address}, a {reason} address; "
                    + ALLOW_PRIVATE_HINT
                )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return VettedTarget(
        scheme=parts.scheme,
        port=port,
        path=path,
        addresses=tuple(dict.fromkeys(str(address) for address in addresses)),
        host_header=parts.netloc.rpartition("@")[2],
        auth=(parts.username, parts.password or "") if parts.username else None,
    )


class PinnedAddressAdapter(HTTPAdapter):
    """Connects to the IP in the request URL; for https, SNI and certificate use the Host header.

    Connection pools are keyed by IP, port and TLS hostname, so a pooled
    connection is only ever reused for the address it was opened to. Its
    connections honour the `AttemptDeadline` of the thread that uses them.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _DeadlineHTTPConnectionPool,
            "https": _DeadlineHTTPSConnectionPool,
        }

    def build_connection_pool_key_attributes(
        self,
        request: PreparedRequest,
        verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[_HostParams, _PoolKwargs]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        host = request.headers.get("Host")
        if host_params["scheme"] != "https" or not host:
            return host_params, pool_kwargs
        hostname = urlsplit("//" + str(host)).hostname
        tls: dict[str, Any] = {
            **pool_kwargs,
            "server_hostname": hostname,
            "assert_hostname": hostname,
        }
        return host_params, cast("_PoolKwargs", tls)


_current = threading.local()


class _Watchdog:
    """One thread per process that fires the `AttemptDeadline`s whose time is up.

    A `threading.Timer` per attempt would start a thread per webhook; this keeps
    the deadlines in a heap instead, ordered by when they fall due.
    """

    def __init__(self) -> None:
        self._reset()
        # A forked child has none of its parent's threads, nor their attempts.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._due: list[tuple[float, int, AttemptDeadline]] = []
        self._wakeup = threading.Condition(threading.Lock())
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: AttemptDeadline, at: float) -> None:
        with self._wakeup:
            heapq.heappush(self._due, (at, next(self._sequence), deadline))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tracker-attempt-deadlines", daemon=True
                )
                self._thread.start()
            elif self._due[0][2] is deadline:
                self._wakeup.notify()  # earlier than what the thread sleeps towards

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._due or self._due[0][0] > time.monotonic():
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._wakeup.wait(timeout)
                _, _, deadline = heapq.heappop(self._due)
            deadline._expire()  # a no-op for a block already left


_watchdog = _Watchdog()


class AttemptDeadline:
    """`with AttemptDeadline(seconds):` shuts the attempt's connections down when time is up.

    Connections opened or reused by `PinnedAddressAdapter` in this thread while
    the block runs are watched. Leave the block before a connection goes back
    to the pool, so a late expiry never cuts a connection another attempt uses.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._connections: list[HTTPConnection] = []
        self._lock = threading.Lock()
        self._done = False

    def __enter__(self) -> AttemptDeadline:
        _current.deadline = self
        _watchdog.watch(self, time.monotonic() + self.seconds)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._lock:
            self._done = True
            self._connections.clear()
        _current.deadline = None

    def watch(self, connection: HTTPConnection) -> None:
        with self._lock:
            if not self._done:
                self._connections.append(connection)

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for connection in self._connections:
                if connection.sock is not None:
                    # Wakes a blocked recv/send in the attempt's thread at once.
                    with suppress(OSError):
                        connection.sock.shutdown(socket.SHUT_RDWR)


def _watch_current_attempt(connection: HTTPConnection) -> None:
    deadline: AttemptDeadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.watch(connection)


class _DeadlineHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch_current_attempt(self)
        super().request(*args, **kwargs)


class _DeadlineHTTPSConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch_current_attempt(self)
        super().request(*args, **kwargs)


class _DeadlineHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection

"""The SSRF guard: which addresses are refused, and how a vetted target is pinned."""

from __future__ import annotations

import ipaddress
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tracker.delivery.netguard import AttemptDeadline, forbidden_reason, vet_callback
from tracker.errors import CallbackRefused, ForbiddenAddress, UnresolvableHost


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "private"),  # documentation range
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fd00::1", "private"),
        ("fc00::5", "private"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:a00:1::", "private"),  # 6to4 wrapping 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 wrapping 169.254.169.254
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    found = forbidden_reason(ipaddress.ip_address(address))
    assert found is not None
    assert found.startswith(reason)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_any_private_answer_refuses_the_host() -> None:
    with pytest.raises(ForbiddenAddress, match=r"10\.1\.2\.3, a private address") as caught:
        vet_callback(
            "https://mixed.example.test/hook",
            allow_private=False,
            resolver=lambda host, port: ["93.184.216.34", "10.1.2.3"],
        )
    assert "TRACKER_WEBHOOK_ALLOW_PRIVATE" in caught.value.message


def test_vetted_target_carries_the_ip_in_the_url_and_the_name_in_the_host_header() -> None:
    target = vet_callback(
        "https://user:pw@hooks.example.test:8443/in/hook?x=1",
        allow_private=False,
        resolver=lambda host, port: ["93.184.216.34", "93.184.216.35"],
    )
    assert target.addresses == ("93.184.216.34", "93.184.216.35")
    assert target.url_for("93.184.216.34") == "https://93.184.216.34:8443/in/hook?x=1"
    assert target.host_header == "hooks.example.test:8443"
    assert target.auth == ("user", "pw")


def test_ipv6_target_is_bracketed_and_ip_literals_skip_dns() -> None:
    def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError("an IP literal needs no resolver")

    target = vet_callback("http://[2606:4700:4700::1111]/h", allow_private=False, resolver=no_dns)
    assert target.url_for(target.addresses[0]) == "http://[2606:4700:4700::1111]:80/h"
    assert target.host_header == "[2606:4700:4700::1111]"


def test_dns_failure_and_empty_answers_are_unresolvable() -> None:
    def failing(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(UnresolvableHost, match="Name or service not known"):
        vet_callback("http://nowhere.example.test/", allow_private=False, resolver=failing)
    with pytest.raises(UnresolvableHost, match="no address"):
        vet_callback("http://empty.example.test/", allow_private=False, resolver=lambda h, p: [])


def test_a_url_without_http_scheme_is_refused() -> None:
    with pytest.raises(CallbackRefused, match="http"):
        vet_callback("ftp://example.com/x", allow_private=True, resolver=lambda h, p: [])


def test_a_short_deadline_fires_on_time_behind_a_long_one() -> None:
    """One watchdog thread keeps every deadline: a later, shorter one is not kept waiting."""
    long = AttemptDeadline(30)
    short = AttemptDeadline(0.2)
    left = AttemptDeadline(0.1)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(long.__enter__).result()
        with left:
            pass  # left in time: never expires
        start = time.monotonic()
        with short:
            while not short.expired and time.monotonic() - start < 5:
                time.sleep(0.01)
        elapsed = time.monotonic() - start
        time.sleep(0.2)
        pool.submit(long.__exit__, None, None, None).result()

    assert short.expired
    assert 0.15 <= elapsed < 1.0
    assert not left.expired
    assert not long.expired

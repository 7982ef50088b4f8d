"""The sandbox resolver against a fake upstream: what it answers, forwards and opens.

The first tests drive :class:`Resolver` with bytes; the last ones serve
from real sockets in a network namespace this test makes, with the real
nftables sets of a sandbox table there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from ember.errors import ConfigError, SandboxError
from ember.network import dns, resolver
from ember.network.answers import Element, Resolver
from ember.network.host import SandboxNetwork, _run, name_set_commands
from ember.network.netns import set_net_namespace
from ember.network.policy import NetworkPolicy
from ember.network.resolver import SandboxResolver
from ember.network.upstream import UPSTREAM_TRIES, host_upstream
from tests.unit.fake_dns import FakeUpstream

RECORDS = {
    "allowed.test": (["10.0.0.1", "10.0.0.2"], 300),
    "short.test": (["10.0.0.3"], 5),
    "other.test": (["10.0.0.66"], 300),
    "files.pypi.test": (["10.0.0.7"], 300),
}
A, AAAA, ANY = 1, 28, 255
T = TypeVar("T")


def query(name: str, qtype: int = A, *, ident: int = 0x4242, qclass: int = 1) -> bytes:
    message = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + dns.encode_name(name.lower())
    if name != name.lower():  # keep the caller's letter case in the question
        message = (
            message[:12] + b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
        )
    return message + struct.pack("!HH", qtype, qclass)


def rcode(reply: bytes | None) -> int:
    assert reply is not None
    flags: int = struct.unpack_from("!H", reply, 2)[0]
    return flags & dns.RCODE


def addresses(reply: bytes | None, name: str, ident: int = 0x4242) -> list[str]:
    assert reply is not None
    answer = dns.parse_answer(reply, ident, name, A, 1, max_ttl=1 << 31)
    return sorted(str(a) for a in answer.addresses)


class Sets:
    """Records what the resolver opens; fails on demand."""

    def __init__(self) -> None:
        self.calls: list[list[Element]] = []
        self.fail = False

    def __call__(self, elements: Sequence[Element]) -> None:
        if self.fail:
            raise SandboxError("nft -f failed: set is full")
        self.calls.append(list(elements))


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream(RECORDS).start()
    yield server
    server.close()


def make(
    upstream: FakeUpstream, entries: list[str], *, internet: bool = False
) -> tuple[Resolver, Sets]:
    sets = Sets()
    host, port = upstream.address
    policy = NetworkPolicy(entries, internet=internet, dns_upstream=f"{host}:{port}")
    return Resolver(policy, policy.dns_upstream, sets), sets


def ask(res: Resolver, message: bytes, *, tcp: bool = False) -> bytes | None:
    return asyncio.run(res.handle(message, tcp=tcp))


def test_an_allowed_name_is_answered_and_its_addresses_opened(upstream: FakeUpstream) -> None:
    res, sets = make(upstream, ["allowed.test:443", "short.test"])
    reply = ask(res, query("Allowed.Test"))
    assert rcode(reply) == 0
    assert addresses(reply, "allowed.test") == ["10.0.0.1", "10.0.0.2"]
    assert sets.calls == [
        [("names_443", ipaddress.IPv4Address("10.0.0.1"), 300),
         ("names_443", ipaddress.IPv4Address("10.0.0.2"), 300)],
    ]  # fmt: skip
    assert upstream.asked == [("allowed.test", A, "udp")]
    # A short TTL still opens the address for a minute: clients use answers a bit past it.
    ask(res, query("short.test"))
    assert sets.calls[-1] == [("names_any", ipaddress.IPv4Address("10.0.0.3"), 60)]


def test_a_wildcard_and_a_cname_chain_open_the_final_addresses(upstream: FakeUpstream) -> None:
    res, sets = make(upstream, ["*.pypi.test", "alias.other.test:80"])
    assert addresses(ask(res, query("files.pypi.test")), "files.pypi.test") == ["10.0.0.7"]
    assert addresses(ask(res, query("alias.other.test")), "alias.other.test") == ["10.0.0.66"]
    assert [e[:2] for call in sets.calls for e in call] == [
        ("names_any", ipaddress.IPv4Address("10.0.0.7")),
        ("names_80", ipaddress.IPv4Address("10.0.0.66")),
    ]


def test_names_not_allowed_are_nxdomain_and_never_leave_the_host(
    upstream: FakeUpstream,
) -> None:
    res, sets = make(upstream, ["allowed.test", "*.pypi.test", "10.0.0.66"])
    for name in ("other.test", "pypi.test", "xallowed.test", "allowed.test.evil", "evilpypi.test"):
        assert rcode(ask(res, query(name))) == dns.Rcode.NXDOMAIN, name
        assert rcode(ask(res, query(name, AAAA))) == dns.Rcode.NXDOMAIN, name
    assert upstream.asked == [] and sets.calls == []
    assert res.stats["nxdomain"] == 10


def test_the_internet_resolves_every_name_but_opens_no_set(upstream: FakeUpstream) -> None:
    res, sets = make(upstream, [], internet=True)
    assert addresses(ask(res, query("other.test")), "other.test") == ["10.0.0.66"]
    assert rcode(ask(res, query("missing.test"))) == dns.Rcode.NXDOMAIN  # the upstream's
    assert sets.calls == []
    assert [name for name, _, _ in upstream.asked] == ["other.test", "missing.test"]


def test_other_types_of_an_allowed_name_are_forwarded_and_open_nothing(
    upstream: FakeUpstream,
) -> None:
    res, sets = make(upstream, ["allowed.test"])
    assert rcode(ask(res, query("allowed.test", AAAA))) == 0
    assert upstream.asked == [("allowed.test", AAAA, "udp")] and sets.calls == []
    assert rcode(ask(res, query("allowed.test", ANY))) == dns.Rcode.NOTIMP
    assert rcode(ask(res, query("allowed.test", A, qclass=3))) == dns.Rcode.NOTIMP  # CHAOS
    assert len(upstream.asked) == 1


def test_asking_again_costs_no_nft_run_while_the_address_stays_open(
    upstream: FakeUpstream,
) -> None:
    res, sets = make(upstream, ["allowed.test"])

    async def twice() -> None:
        await res.handle(query("allowed.test"), tcp=False)
        await res.handle(query("allowed.test"), tcp=False)

    asyncio.run(twice())
    assert len(sets.calls) == 1 and res.stats["answered"] == 2


def test_a_set_that_cannot_take_the_address_makes_servfail(upstream: FakeUpstream) -> None:
    res, sets = make(upstream, ["allowed.test"])
    sets.fail = True
    assert rcode(ask(res, query("allowed.test"))) == dns.Rcode.SERVFAIL


def test_a_silent_upstream_makes_servfail_in_bounded_time(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ember.network.upstream.UPSTREAM_TIMEOUT_S", 0.2)
    upstream.silent = True
    res, _ = make(upstream, ["allowed.test"])
    started = time.monotonic()
    assert rcode(ask(res, query("allowed.test"))) == dns.Rcode.SERVFAIL
    assert time.monotonic() - started < 2
    assert len(upstream.asked) == UPSTREAM_TRIES


def test_a_big_answer_is_truncated_over_udp_and_whole_over_tcp(upstream: FakeUpstream) -> None:
    res, sets = make(upstream, ["*.test"])
    cut = ask(res, query("big.test"))
    assert cut is not None and len(cut) <= 512
    assert struct.unpack_from("!H", cut, 2)[0] & dns.TC
    # The upstream was asked over TCP too, so every address is open already.
    assert [how for _, _, how in upstream.asked] == ["udp", "tcp"]
    assert len(sets.calls[0]) == 60
    whole = ask(res, query("big.test"), tcp=True)
    assert len(addresses(whole, "big.test")) == 60


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"", None),
        (b"\x00" * 11, None),
        (query("allowed.test")[:2] + b"\x81\x80" + query("allowed.test")[4:], None),  # response
        (query("allowed.test")[:13], dns.Rcode.FORMERR),
        (query("allowed.test")[:12] + b"\xc0\x0c\x00\x01\x00\x01", dns.Rcode.FORMERR),
        (query("allowed.test")[:2] + b"\x28\x00" + query("allowed.test")[4:], dns.Rcode.NOTIMP),
    ],
)
def test_malformed_messages_are_dropped_or_formerr(
    upstream: FakeUpstream, message: bytes, expected: int | None
) -> None:
    res, sets = make(upstream, ["allowed.test"])
    reply = ask(res, message)
    if expected is None:
        assert reply is None
    else:
        assert rcode(reply) == expected
    assert upstream.asked == [] and sets.calls == []


def test_the_host_upstream_is_the_first_ipv4_nameserver(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example\nnameserver ::1\nnameserver 10.0.0.53\n")
    assert host_upstream(str(conf)) == ("10.0.0.53", 53)
    conf.write_text("nameserver fe80::1%eth0\n")
    assert host_upstream(str(conf)) is None
    assert host_upstream(str(tmp_path / "missing")) is None


def test_names_without_an_upstream_are_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolver, "host_upstream", lambda: None)
    with pytest.raises(ConfigError, match="dns_upstream="):
        SandboxResolver.start(
            "/nonexistent", NetworkPolicy(["a.test"]), Sets(), address="1.1.1.1", guest_ip="x"
        )


# Real sockets in a namespace of the test's own ---------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"embdns-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", "127.0.0.2/8", "dev", "lo"], check=False)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def in_netns(path: str, work: Callable[[], T]) -> T:
    """Run ``work()`` in a thread that has entered the namespace at ``path``."""
    result: list[T] = []

    def run() -> None:
        fd = os.open(path, os.O_RDONLY)
        set_net_namespace(fd)
        os.close(fd)
        result.append(work())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert result, "the work in the namespace failed"
    return result[0]


def udp_ask(message: bytes, source: str = "127.0.0.1", timeout: float = 5.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(message, ("127.0.0.1", 53))
        try:
            return sock.recv(4096)
        except TimeoutError:
            return None


def tcp_ask(message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", 53), timeout=5) as sock:
        sock.sendall(struct.pack("!H", len(message)) + message)
        reader = sock.makefile("rb")
        (length,) = struct.unpack("!H", reader.read(2))
        return reader.read(length)


def test_a_served_resolver_opens_real_set_elements(netns: str, upstream: FakeUpstream) -> None:
    host, port = upstream.address
    policy = NetworkPolicy(["allowed.test:443", "*.pypi.test"], dns_upstream=f"{host}:{port}")
    _run(["nft", "-f", "-"], SandboxNetwork(slot=0, policy=policy).sandbox_ruleset(), netns=netns)

    def write(elements: Sequence[Element]) -> None:
        _run(["nft", "-f", "-"], name_set_commands(elements), netns=netns)

    served = SandboxResolver.start(netns, policy, write, address="127.0.0.1", guest_ip="127.0.0.1")
    try:
        reply = in_netns(netns, lambda: udp_ask(query("allowed.test")))
        assert isinstance(reply, bytes) and addresses(reply, "allowed.test") == [
            "10.0.0.1", "10.0.0.2"
        ]  # fmt: skip
        listed = subprocess.run(
            ["ip", "netns", "exec", os.path.basename(netns), "nft", "list", "set", "ip", "ember",
             "names_443"], capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "10.0.0.1 timeout 5m" in listed and "10.0.0.2 timeout 5m" in listed
        reply = in_netns(netns, lambda: tcp_ask(query("files.pypi.test")))
        assert isinstance(reply, bytes) and addresses(reply, "files.pypi.test") == ["10.0.0.7"]
        reply = in_netns(netns, lambda: udp_ask(query("other.test")))
        assert isinstance(reply, bytes) and rcode(reply) == dns.Rcode.NXDOMAIN
        # Anyone but the guest is not answered at all (no reflection).
        assert in_netns(netns, lambda: udp_ask(query("allowed.test"), "127.0.0.2", 0.5)) is None
        assert served.stats["dropped"] == 1
    finally:
        served.close()
    # Closed: nothing listens any more.
    assert in_netns(netns, lambda: udp_ask(query("allowed.test"), timeout=0.5)) is None


def test_a_flood_of_garbage_leaves_the_resolver_answering(
    netns: str, upstream: FakeUpstream
) -> None:
    host, port = upstream.address
    policy = NetworkPolicy(["allowed.test"], dns_upstream=f"{host}:{port}")
    sets = Sets()
    served = SandboxResolver.start(netns, policy, sets, address="127.0.0.1", guest_ip="127.0.0.1")
    try:

        def flood() -> bytes | None:
            rng = random.Random(7)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for _ in range(2000):
                    sock.sendto(rng.randbytes(rng.randrange(0, 700)), ("127.0.0.1", 53))
                # A TCP connection that sends half a query and stalls, and one too long.
                with socket.create_connection(("127.0.0.1", 53)) as stalled:
                    stalled.sendall(b"\x00\x40abc")
                    with socket.create_connection(("127.0.0.1", 53)) as long:
                        long.sendall(b"\xff\xff" + bytes(100))
                        for _ in range(5):  # as a stub resolver does: the flood filled
                            reply = udp_ask(query("allowed.test"), timeout=1)  # the buffer
                            if reply is not None:
                                return reply
                        return None

        reply = in_netns(netns, flood)
        assert isinstance(reply, bytes) and addresses(reply, "allowed.test"), served.stats
        assert served.stats["errors"] == 0
    finally:
        served.close()


def test_a_sandbox_network_serves_its_resolver_and_closes_it(upstream: FakeUpstream) -> None:
    host, port = upstream.address
    network = SandboxNetwork.create(NetworkPolicy(["a.test"], dns_upstream=f"{host}:{port}"))
    try:
        assert network.resolver is not None
        listening = subprocess.run(
            ["ip", "netns", "exec", network.netns, "ss", "-Hlnu"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "172.16.0.1:53" in listening
    finally:
        network.close()
    assert network.resolver is None
    assert not os.path.exists(network.netns_path)
    # The kernel dismantles a namespace from a workqueue once its last reference is gone: the
    # veth goes a moment later (seconds on a loaded host), but it must go.
    for _ in range(300):
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        if f" {network.veth}@" not in links:
            break
        time.sleep(0.1)
    assert f" {network.veth}@" not in links

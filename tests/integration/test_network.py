"""virtio-net end to end: real TAPs in real namespaces, real nftables, real guests.

The "remote" hosts are network namespaces this test makes (tests/integration/nethost.py).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from ember import NetworkPolicy
from ember.errors import ConfigError
from ember.network.host import GATEWAY_IP, GUEST_IP
from ember.sandbox import Sandbox
from ember.templates import templates_root
from tests.integration.conftest import Images, ember
from tests.integration.nethost import GUEST_PORT, GUEST_SERVER, PROBE, RemoteHost

ALLOWED, OTHER = 8080, 8081


# What the guest's resolver (getaddrinfo through /etc/resolv.conf) makes of a name.
RESOLVE = """
def _resolve(name):
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET)})
    except socket.gaierror as exc:
        return exc.errno
"""


def probe(sb: Sandbox, host: str, port: int) -> str:
    result = sb.run_code(f"_probe({host!r}, {port})", timeout=60)
    assert result.error is None, result.error
    assert result.value is not None
    return str(eval(result.value))  # the repr of a str


@pytest.fixture(scope="module")
def remote(images: Images) -> Iterator[RemoteHost]:
    host = RemoteHost(1, (ALLOWED, OTHER)).start()
    yield host
    host.close()


@pytest.fixture(scope="module")
def remote2(images: Images) -> Iterator[RemoteHost]:
    host = RemoteHost(2, (ALLOWED,)).start()
    yield host
    host.close()


@pytest.fixture(scope="module")
def dns_host(remote: RemoteHost, remote2: RemoteHost) -> Iterator[RemoteHost]:
    """The upstream DNS server the named sandboxes' resolvers ask: it knows every name."""
    names = {"allowed.test": remote.address, "api.wild.test": remote.address,
             "denied.test": remote2.address}  # fmt: skip
    host = RemoteHost(3, (), dns=names).start()
    yield host
    host.close()


@pytest.fixture(scope="module")
def allowed(remote: RemoteHost) -> Iterator[Sandbox]:
    """A sandbox that may reach the first test host's port 8080 and nothing else."""
    with Sandbox(network=NetworkPolicy([f"{remote.address}:{ALLOWED}"])) as sb:
        sb.run_code(PROBE)
        yield sb


@pytest.fixture(scope="module")
def server(images: Images) -> Iterator[Sandbox]:
    """A networked sandbox running a TCP server on GUEST_PORT, allowed to reach nothing."""
    with Sandbox(network=NetworkPolicy()) as sb:
        sb.run_code(GUEST_SERVER)
        yield sb


def test_network_is_off_by_default(images: Images) -> None:
    with Sandbox() as sb:
        assert sb.address is None
        names = sb.run_code("import socket; [n for _, n in socket.if_nameindex()]").value
        assert names == "['lo']"
        with pytest.raises(ConfigError, match="no network"):
            sb.expose(GUEST_PORT)


def test_guest_has_an_address_and_reaches_an_allowed_server(
    allowed: Sandbox, remote: RemoteHost
) -> None:
    # The test host sees the sandbox's own address (the guest is masqueraded behind it).
    assert probe(allowed, remote.address, ALLOWED) == f"hello {allowed.address} on {ALLOWED}"
    local = allowed.run_code(
        f"_s = socket.create_connection(({remote.address!r}, {ALLOWED}), timeout=15)\n"
        "_name = _s.getsockname()[0]; _s.close(); _name"
    ).value
    assert local == repr(GUEST_IP)


def test_destinations_off_the_allow_list_are_refused(
    allowed: Sandbox, remote: RemoteHost, remote2: RemoteHost
) -> None:
    assert probe(allowed, remote.address, OTHER) == "ConnectionRefusedError"
    assert probe(allowed, remote2.address, ALLOWED) == "ConnectionRefusedError"
    # The allowed port still works afterwards: refusals are per destination.
    assert probe(allowed, remote.address, ALLOWED).startswith("hello ")


def test_the_host_itself_is_unreachable_even_with_internet_on(images: Images) -> None:
    with Sandbox(network=True) as sb:
        sb.run_code(PROBE)
        network = sb._vmm.network
        assert network is not None
        with socket.create_server((network.host_ip, 0)) as listener:
            port = listener.getsockname()[1]
            assert probe(sb, network.host_ip, port) == "ConnectionRefusedError"
        # Its gateway (the sandbox's namespace) offers the guest nothing either.
        assert probe(sb, "172.16.0.1", 22) == "ConnectionRefusedError"


def test_an_exposed_port_reaches_the_guest_from_the_host(server: Sandbox) -> None:
    address, port = server.expose(GUEST_PORT)
    assert (address, port) == (server.address, GUEST_PORT)
    assert server.expose(GUEST_PORT) == (address, port)  # idempotent
    with socket.create_connection((address, port), timeout=30) as conn:
        assert conn.makefile().readline().startswith("guest hello ")


def test_sandboxes_cannot_reach_each_other_unless_allowed(
    allowed: Sandbox, server: Sandbox
) -> None:
    address, port = server.expose(GUEST_PORT)
    assert probe(allowed, address, port) == "ConnectionRefusedError"
    with Sandbox(network=NetworkPolicy([f"{address}:{port}"])) as peer:
        peer.run_code(PROBE)
        assert probe(peer, address, port) == f"guest hello {peer.address}"
        # Allowed to that one port only.
        assert probe(peer, address, port + 1) == "ConnectionRefusedError"


def test_a_fork_gets_a_network_of_its_own(allowed: Sandbox, remote: RemoteHost) -> None:
    with allowed.fork() as child:
        assert child.address is not None and child.address != allowed.address
        assert probe(child, remote.address, ALLOWED) == f"hello {child.address} on {ALLOWED}"
        assert probe(child, remote.address, OTHER) == "ConnectionRefusedError"
    assert probe(allowed, remote.address, ALLOWED).startswith("hello ")


def test_a_networked_template_needs_a_network(allowed: Sandbox) -> None:
    try:
        allowed.snapshot("test-networked")
        listed = ember("template", "ls").stdout.splitlines()
        assert any(line.split()[:4] == ["test-networked", *line.split()[1:3], "network"]
                   for line in listed), listed  # fmt: skip
        with pytest.raises(ConfigError, match="pass network="):
            Sandbox(template="test-networked")
        with Sandbox(template="test-networked", network=NetworkPolicy()) as restored:
            assert restored.address is not None
        with Sandbox() as plain:
            plain.snapshot("test-plain")
        with pytest.raises(ConfigError, match="without a network"):
            Sandbox(network=True, template="test-plain")
    finally:
        for name in ("test-networked", "test-plain"):
            shutil.rmtree(templates_root() / name, ignore_errors=True)


def test_cli_allow_reaches_only_that_destination(remote: RemoteHost) -> None:
    code = PROBE + (
        f"print(_probe({remote.address!r}, {ALLOWED}))\nprint(_probe({remote.address!r}, {OTHER}))"
    )
    result = ember("exec", "--allow", f"{remote.address}:{ALLOWED}", "--", "python3", "-c", code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("hello 10.253.") and lines[0].endswith(f"on {ALLOWED}")
    assert lines[1] == "ConnectionRefusedError"


def test_a_parked_sandbox_wakes_for_a_connection_from_the_network(server: Sandbox) -> None:
    address, port = server.expose(GUEST_PORT)
    wait_until_parked_for_good(server)
    # Nothing else will wake it now: only the frames of this connection can.
    with socket.create_connection((address, port), timeout=30) as conn:
        assert conn.makefile().readline().startswith("guest hello ")


def wait_until_parked_for_good(sb: Sandbox, quiet_s: float = 5.0) -> None:
    """Until the idle sandbox is parked and stays so for ``quiet_s`` (the vsock device's
    own close timers may wake it once after the last agent call)."""
    deadline = time.monotonic() + 120
    parked_since: float | None = None
    while True:
        assert time.monotonic() < deadline, "the idle sandbox never stayed parked"
        if sb._vmm.control("status")["paused"]:
            parked_since = parked_since or time.monotonic()
            if time.monotonic() - parked_since >= quiet_s:
                return
        else:
            parked_since = None
        time.sleep(0.1)


def resolve(sb: Sandbox, name: str) -> list[str] | int:
    result = sb.run_code(f"_resolve({name!r})", timeout=60)
    assert result.error is None, result.error
    assert result.value is not None
    value: list[str] | int = eval(result.value)
    return value


def test_allowed_names_resolve_and_only_their_addresses_open(
    images: Images, remote: RemoteHost, remote2: RemoteHost, dns_host: RemoteHost
) -> None:
    policy = NetworkPolicy(
        [f"allowed.test:{ALLOWED}", "*.wild.test:8080"], dns_upstream=dns_host.address
    )
    with Sandbox(network=policy) as sb:
        sb.run_code(PROBE + RESOLVE)
        resolv_conf = sb.run_code("open('/etc/resolv.conf').read()").value
        assert resolv_conf == repr(f"nameserver {GATEWAY_IP}\n")  # written by ember-init
        # Not resolved yet: the address is not open.
        assert probe(sb, remote.address, ALLOWED) == "ConnectionRefusedError"
        assert resolve(sb, "Allowed.Test") == [remote.address]
        assert probe(sb, "allowed.test", ALLOWED) == f"hello {sb.address} on {ALLOWED}"
        assert probe(sb, "allowed.test", OTHER) == "ConnectionRefusedError"  # its port only
        assert resolve(sb, "api.wild.test") == [remote.address]
        # Names off the list do not resolve, and their addresses stay refused.
        assert resolve(sb, "denied.test") == socket.EAI_NONAME
        assert resolve(sb, "wild.test") == socket.EAI_NONAME
        assert probe(sb, remote2.address, ALLOWED) == "ConnectionRefusedError"
        # The answer opened the address in the sandbox's set, for the record's TTL.
        network = sb._vmm.network
        assert network is not None
        listed = subprocess.run(
            ["ip", "netns", "exec", network.netns, "nft", "list", "set", "ip", "ember",
             f"names_{ALLOWED}"], capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"{remote.address} timeout 5m" in listed
        assert remote2.address not in listed


def test_a_sandbox_with_only_addresses_gets_nxdomain_for_every_name(
    allowed: Sandbox, remote: RemoteHost
) -> None:
    allowed.run_code(RESOLVE)
    assert resolve(allowed, "allowed.test") == socket.EAI_NONAME

"""Pooled sandbox networks (ember.network.pool) with real guests.

A pooled network waits with closed rules and gets a sandbox's policy loaded
while its VMM restores: these tests show the guest then gets exactly that
policy, that two sandboxes never share a pooled network, and that a network
a crashed process left behind is rebuilt clean before a sandbox reuses its slot.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

import ember.network.host as host
import ember.network.pool as pool_module
import ember.network.slots as slots
from ember import NetworkPolicy
from ember.network.host import HOST_TABLE
from ember.network.pool import NetworkPool
from ember.sandbox import Sandbox
from tests.integration.conftest import Images
from tests.integration.nethost import GUEST_PORT, GUEST_SERVER, PROBE, RemoteHost
from tests.waiting import wait_for

ALLOWED, OTHER = 8090, 8091
# A process owning a networked sandbox with an exposed port and a rule for the host.
OWNER = """
import time
from ember import NetworkPolicy, Sandbox
sb = Sandbox(network=NetworkPolicy(["10.9.9.9:443"]))
sb.expose(8000)
print(sb._vmm.network.slot, sb._vmm.vmm_pid, flush=True)
time.sleep(600)
"""


def probe(sb: Sandbox, address: str, port: int) -> str:
    result = sb.run_code(f"_probe({address!r}, {port})", timeout=60)
    assert result.error is None and result.value is not None, result.error
    return str(eval(result.value))


def nft_in(netns: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={netns}", "nft", "list", "ruleset"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def host_chain(slot: int) -> str:
    return subprocess.run(
        ["nft", "list", "chain", "inet", HOST_TABLE, f"sandbox{slot}"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip


@pytest.fixture(scope="module")
def remote(images: Images) -> Iterator[RemoteHost]:
    remote_host = RemoteHost(4, (ALLOWED, OTHER)).start()
    yield remote_host
    remote_host.close()


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[NetworkPool]:
    """This process's pool for the test: two networks, filled before it starts."""
    fresh = NetworkPool(2)
    monkeypatch.setattr(pool_module, "_pool", fresh)
    fresh.fill()
    wait_for(lambda: fresh.ready() == 2, 60, "the pool to fill")
    yield fresh
    fresh.shutdown()


def test_pooled_networks_get_their_own_policy_and_are_never_shared(
    remote: RemoteHost, pool: NetworkPool
) -> None:
    pooled = {n.slot for n in pool._ready}
    policy = NetworkPolicy([f"{remote.address}:{ALLOWED}"])
    boxes: list[Sandbox] = []
    lock = threading.Lock()

    def make() -> None:
        sb = Sandbox(network=policy)
        with lock:
            boxes.append(sb)

    threads = [threading.Thread(target=make) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(boxes) == 2
        networks = [sb._vmm.network for sb in boxes]
        assert all(n is not None for n in networks)
        slots = {n.slot for n in networks if n is not None}
        assert slots == pooled  # both came from the pool, one each
        assert len({sb.address for sb in boxes}) == 2
        wait_for(lambda: pool.ready() == 2, 60, "the pool to refill")
        assert not {n.slot for n in pool._ready} & slots
        for sb in boxes:
            sb.run_code(PROBE)
            assert probe(sb, remote.address, ALLOWED) == f"hello {sb.address} on {ALLOWED}"
            assert probe(sb, remote.address, OTHER) == "ConnectionRefusedError"
    finally:
        for sb in boxes:
            sb.close()
    paths = [f"{host.NETNS_DIR}/ember-{slot}" for slot in slots]
    wait_for(lambda: not any(map(os.path.exists, paths)), 30, "the background deletion")


def test_a_crashed_owners_network_is_cleaned_before_a_sandbox_reuses_it(
    images: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "EMBER_NET_POOL": "0"}
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, env=env)
    try:
        assert owner.stdout is not None
        slot, vmm_pid = map(int, owner.stdout.readline().split())
        netns = f"{host.NETNS_DIR}/ember-{slot}"
        assert "dnat to" in nft_in(netns) and "10.9.9.9" in host_chain(slot)
    finally:
        owner.kill()  # the crash: the owner first; its VMM dies with the owner's zygote
        owner.wait()
        with contextlib.suppress(ProcessLookupError):  # gone already, or about to be
            os.kill(vmm_pid, signal.SIGKILL)
    assert os.path.exists(netns)  # left behind, its lock free

    monkeypatch.setattr(slots.random, "randrange", lambda n: slot)  # claim that slot first
    monkeypatch.setattr(pool_module, "_pool", NetworkPool(0))
    try:
        with Sandbox(network=True) as sb:
            network = sb._vmm.network
            assert network is not None and network.slot == slot
            rules = nft_in(network.netns_path)
            assert "dnat to" not in rules and "10.9.9.9" not in rules
            assert "10.9.9.9" not in host_chain(slot)
            sb.run_code(GUEST_SERVER)
            address, port = sb.expose(GUEST_PORT)
            with socket.create_connection((address, port), timeout=30) as conn:
                assert conn.makefile().readline().startswith("guest hello ")
    finally:
        pool_module.network_pool().shutdown()
    assert not os.path.exists(netns)

"""The sandbox network pool (ember.network.pool) on real namespaces, veths, TAPs and nftables.

Root only, like test_net_tap.py. No VM: what matters here is which slot and
namespace each taker gets, and what rules are in it.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

import ember.network.host as host
import ember.network.pool as pool_module
import ember.network.slots as slots
from ember.errors import SandboxError
from ember.network.host import CLOSED, HOST_TABLE, SandboxNetwork
from ember.network.policy import NetworkPolicy
from ember.network.pool import POOLED_DIR, NetworkPool
from ember.network.slots import LOCK_DIR
from tests.waiting import wait_for

OWNER = """
import sys, time
from ember.network.host import SandboxNetwork
from ember.network.policy import NetworkPolicy
net = SandboxNetwork.create(NetworkPolicy(["10.9.9.9:443"]))
net.expose(8000)
print(net.slot, flush=True)
time.sleep(600)
"""


def nft_in(netns: str, *args: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={netns}", "nft", *args], capture_output=True, text=True, check=True
    ).stdout


def host_chain(slot: int) -> str:
    return subprocess.run(
        ["nft", "list", "chain", "inet", HOST_TABLE, f"sandbox{slot}"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip


def slot_is_free(slot: int) -> bool:
    fd = os.open(f"{LOCK_DIR}/{slot}.lock", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


@pytest.fixture
def owner() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Another process holding a network with a policy, a host rule and an exposed port."""
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert proc.stdout is not None
    slot = int(proc.stdout.readline())
    yield proc, slot
    proc.kill()
    proc.wait()
    if os.path.exists(f"{host.NETNS_DIR}/ember-{slot}") and slot_is_free(slot):
        SandboxNetwork(slot, NetworkPolicy()).close()


def test_concurrent_takers_never_share_a_network_and_released_ones_are_deleted() -> None:
    pool = NetworkPool(2)
    try:
        pool.fill()
        wait_for(lambda: pool.ready() == 2, 60, "the pool to fill")
        taken: list[SandboxNetwork] = []
        lock = threading.Lock()

        def take() -> None:
            network = pool.take(NetworkPolicy(internet=True))
            with lock:
                taken.append(network)

        threads = [threading.Thread(target=take) for _ in range(5)]  # 2 pooled, 3 made now
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len({n.slot for n in taken}) == 5
        assert len({os.stat(n.netns_path).st_ino for n in taken}) == 5
        for network in taken:
            network.wait_applied()
            pool.settled(network)
        wait_for(lambda: pool.ready() == 2, 60, "the pool to refill")
        pooled = {n.slot for n in pool._ready}
        assert not pooled & {n.slot for n in taken}  # refills are new slots, never a taken one
        for network in taken:
            pool.release(network)
            assert not slot_is_free(network.slot)  # locked until its namespace is gone
    finally:
        pool.shutdown()
    for slot in [n.slot for n in taken] + sorted(pooled):
        assert not os.path.exists(f"{host.NETNS_DIR}/ember-{slot}")
        assert slot_is_free(slot)
        assert host_chain(slot) == ""


def test_a_slot_another_process_holds_is_never_claimed(
    owner: tuple[subprocess.Popen[str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, slot = owner
    monkeypatch.setattr(slots.random, "randrange", lambda n: slot)  # try its slot first
    network = SandboxNetwork.prepare()
    try:
        assert network.slot != slot
        assert "dnat to" in nft_in(f"{host.NETNS_DIR}/ember-{slot}", "list", "ruleset")
    finally:
        network.close()


def test_a_dead_owners_network_is_cleaned_before_reuse(
    owner: tuple[subprocess.Popen[str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, slot = owner
    netns = f"{host.NETNS_DIR}/ember-{slot}"
    assert "10.9.9.9" in host_chain(slot)
    leftover = subprocess.Popen(["nsenter", f"--net={netns}", "sleep", "600"])
    try:
        wait_for(
            lambda: os.stat(f"/proc/{leftover.pid}/ns/net").st_ino == os.stat(netns).st_ino,
            10, "the leftover process to enter the namespace",
        )  # fmt: skip
        # A mark only the old namespace has (its inode number may be reused by the new one).
        subprocess.run(["nsenter", f"--net={netns}", "sysctl", "-qw", "net.ipv4.ip_default_ttl=33"],
                       check=True)  # fmt: skip
        proc.kill()
        proc.wait()
        monkeypatch.setattr(slots.random, "randrange", lambda n: slot)
        pool = NetworkPool(0)
        network = pool.take(NetworkPolicy(internet=True))
        try:
            assert network.slot == slot
            network.wait_applied()
            ttl = subprocess.run(["nsenter", f"--net={network.netns_path}", "sysctl", "-n",
                                  "net.ipv4.ip_default_ttl"],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            assert ttl.strip() == "64"  # a new namespace: the old one's mark (33) is not there
            rules = nft_in(network.netns_path, "list", "ruleset")
            assert "dnat to" not in rules and "10.9.9.9" not in rules
            assert "10.9.9.9" not in host_chain(slot)  # the host chain was flushed too
            assert leftover.wait(10) == -9  # killed: it kept the old namespace alive
        finally:
            network.close()
            pool.shutdown()
    finally:
        leftover.kill()
        leftover.wait()


def test_apply_loads_only_the_policy_over_a_prepared_network() -> None:
    policy = NetworkPolicy(["10.9.9.9:443", "a.test:443"], dns_upstream="127.0.0.1")
    network = SandboxNetwork.prepare()
    try:
        assert network.policy == CLOSED and network.resolver is None
        assert network.apply(policy)  # over CLOSED rules: the guest may run meanwhile
        network.wait_applied()
        assert network.resolver is not None
        egress = nft_in(network.netns_path, "list", "chain", "ip", "ember", "egress")
        assert "10.9.9.9" in egress and "@names_443" in egress
        assert "10.9.9.9" in host_chain(network.slot)
        with pytest.raises(SandboxError, match="in use"):
            network.apply(NetworkPolicy(internet=True))
    finally:
        network.close()


def test_a_network_made_for_another_policy_is_replaced_not_run_meanwhile() -> None:
    network = SandboxNetwork.prepare(NetworkPolicy(["10.9.9.9:443", "a.test:80"]))
    try:
        assert not network.apply(NetworkPolicy(["10.8.8.8:22"]))
        network.wait_rules()
        rules = nft_in(network.netns_path, "list", "table", "ip", "ember")
        assert "10.8.8.8" in rules and "10.9.9.9" not in rules and "names_80" not in rules
        chain = host_chain(network.slot)
        assert "10.8.8.8" in chain and "10.9.9.9" not in chain
    finally:
        network.close()


def test_the_pool_prefers_a_network_made_for_the_policy_taken() -> None:
    pool = NetworkPool(1)
    policy = NetworkPolicy(internet=True)
    try:
        first = pool.take(policy)
        first.wait_applied()
        pool.settled(first)  # refills for this policy
        wait_for(lambda: pool.ready() == 1, 60, "the pool to refill")
        second = pool.take(policy)
        assert second.policy == policy and not second._pending  # nothing left to load
        for network in (first, second):
            pool.release(network)
    finally:
        pool.shutdown()


def test_a_pooled_network_left_by_a_killed_process_is_swept_by_the_next_pool() -> None:
    script = (
        "import os, time\n"
        "from ember.network.pool import NetworkPool\n"
        "pool = NetworkPool(2)\n"
        "pool.fill()\n"
        "while pool.ready() < 2: time.sleep(0.05)\n"
        "print(' '.join(str(n.slot) for n in pool._ready), flush=True)\n"
        "taken = pool.take(pool._ready[0].policy)\n"  # a sandbox's: never swept
        "print(taken.slot, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    pooled = [int(word) for word in proc.stdout.readline().split()]
    taken = int(proc.stdout.readline())
    assert all(os.path.exists(f"{POOLED_DIR}/{slot}") for slot in pooled if slot != taken)
    assert not os.path.exists(f"{POOLED_DIR}/{taken}")
    proc.kill()  # no exit handlers: its networks stay behind
    proc.wait()
    left = [slot for slot in pooled if slot != taken]
    pool = NetworkPool(0)
    try:
        pool.fill()  # starts its thread, which sweeps first
        wait_for(
            lambda: not any(os.path.exists(f"{host.NETNS_DIR}/ember-{s}") for s in left),
            30, "the sweep",
        )  # fmt: skip
        assert all(slot_is_free(slot) and host_chain(slot) == "" for slot in left)
        assert os.path.exists(f"{host.NETNS_DIR}/ember-{taken}")  # a sandbox's: kept
    finally:
        pool.shutdown()
        SandboxNetwork(taken, CLOSED).close()


def test_a_forked_child_forgets_the_pool_and_the_parent_keeps_its_networks() -> None:
    pool = NetworkPool(1)
    pool_module._pool, saved = pool, pool_module._pool
    try:
        pool.fill()
        wait_for(lambda: pool.ready() == 1, 60, "the pool to fill")
        (network,) = pool._ready
        pid = os.fork()
        if pid == 0:  # the child: no pool, and its copy of the lock closed
            os._exit(0 if pool_module._pool is None and network.lock_fd == -1 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert network.lock_fd >= 0 and not slot_is_free(network.slot)
        assert os.path.exists(network.netns_path)
    finally:
        pool_module._pool = saved
        pool.shutdown()
    assert not os.path.exists(network.netns_path)


def test_a_link_that_vanishes_before_its_delete_is_gone_not_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dead namespace takes its veth with it asynchronously, after the look at /sys."""
    name = "embertest0"
    subprocess.run(
        ["ip", "link", "add", name, "type", "veth", "peer", "name", "embertest1"], check=True
    )
    real_run = slots._run

    def gone_first(argv: list[str], stdin: str) -> None:
        subprocess.run(["ip", "link", "delete", name], check=True)  # the kernel's clean-up
        real_run(argv, stdin)

    monkeypatch.setattr(slots, "_run", gone_first)
    slots._delete_link(name)
    assert not os.path.exists(f"/sys/class/net/{name}")
    monkeypatch.setattr(slots, "_run", real_run)
    with pytest.raises(SandboxError, match="ip link failed"):
        slots._delete_link("lo")  # still there after its delete failed: a real failure

"""A booted guest made ready for its template snapshot: warm, idle, its worker polling.

What a template holds is what every sandbox restored from it starts with, so the build does the
slow things once, here: the preload modules imported (a module that does not import is a build
error, in one line), the agent's code worker and pre-started interpreters started and waited
for, the guest kernel's first TCP and UDP sockets made, the common commands' files read into the
page cache, the guest left idle, and then the worker left polling its code ring with the guest
kernel told that the pause is near (kernel patch ``0009``). :mod:`ember.templates` boots the
guest, calls :func:`check_preload` and :func:`wait_warm`, and takes the snapshot.
"""

from __future__ import annotations

import time

from ember.client import AgentClient
from ember.errors import BuildError, SandboxError
from ember.launcher import VmmProcess

__all__ = ["SNAPSHOT_RUN_MS", "WARM_TIMEOUT_S", "check_preload", "top_up_rx", "wait_warm"]

WARM_TIMEOUT_S = 300.0
# A pool interpreter costs the guest ~7 s to start and, with its pre-faulted heap and preload
# modules (numpy: about a minute), several times that; they start one after another.
POOL_TIMEOUT_S = 1200.0
SETTLE_TIMEOUT_S = 10.0
IDLE_WINDOW_S = 0.2
POLL_LINGER_S = 60.0  # the worker polls this long: the snapshot is taken well within it
POLL_SETTLE_S = 0.3
IDLE_CPU_S = 0.002
RX_FULL_MARGIN = 8  # receive buffers a queue may lack and count as full (top_up_rx)


_PRELOAD_CHECK = """
def _ember_preload_check(names):
    import importlib
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            raise ImportError(f"{name}: {type(exc).__name__}: {exc}") from None
_ember_preload_check(%r)
del _ember_preload_check
"""


def check_preload(vmm: VmmProcess, name: str, modules: tuple[str, ...]) -> None:
    """Import the preload list through run_code (it waits for the worker, which imported it
    already): a module that cannot be imported in the guest fails the build, in one line."""
    client = AgentClient(vmm.connect)
    try:
        result = client.run_code(_PRELOAD_CHECK % (list(modules),), timeout=WARM_TIMEOUT_S)
    finally:
        client.close()
    if result.error is not None:
        message = (result.error.message.strip().splitlines() or [""])[-1]
        raise BuildError(
            f"template {name}: preloading failed in the guest: {result.error.type}: {message}"
        )


#: Console lines that explain a failed pool: the agent's own, and the guest kernel's OOM killer.
_POOL_EVIDENCE = ("interpreter pool:", "Out of memory", "oom-kill", "Killed process")


def _pool_evidence(console: str) -> str:
    lines = [line for line in console.splitlines() if any(m in line for m in _POOL_EVIDENCE)]
    return "".join(f"\n  guest console: {line.strip()}" for line in lines[-8:])


def wait_warm(vmm: VmmProcess) -> AgentClient:
    """Ping until the agent's code worker and its pre-started interpreters are ready, so
    restores start warm; return the client holding one idle agent connection, which every
    restore can take over (vsock RESUME). A pool that failed (a preload module that does not
    import, say) fails the build here, with the agent's reason, never a restore later."""
    client = AgentClient(vmm.connect)
    deadline = time.monotonic() + WARM_TIMEOUT_S
    pool_deadline = time.monotonic() + POOL_TIMEOUT_S
    while True:
        pong = client.ping()
        pool = pong.get("pool")  # absent: an agent without a pool
        pool_state = pool.get("state") if isinstance(pool, dict) else "off"
        if pool_state == "failed":
            assert isinstance(pool, dict)
            raise SandboxError(
                f"the template's pre-started interpreters failed: {pool.get('error') or '?'}"
                + _pool_evidence(vmm.console_tail(400))
            )
        worker_ready = pong.get("worker") == "ready"
        if worker_ready and pool_state in ("ready", "off"):
            break
        if vmm.exited():
            raise vmm.crashed("the template VM stopped while warming up")
        now = time.monotonic()
        if not worker_ready and now > deadline:
            raise SandboxError("the template's code worker did not start")
        if now > pool_deadline:
            raise SandboxError(
                f"the template's pre-started interpreters did not start in {POOL_TIMEOUT_S:.0f} s"
            )
        time.sleep(0.2)
    _warm_guest_kernel(client)
    # Let the last connection close: one still open in the snapshot would be reset in
    # every restored copy, which costs each of them ~0.1 s of guest-kernel time here.
    client.close()
    settle = time.monotonic() + SETTLE_TIMEOUT_S
    while vmm.control("status")["host_connections"]:
        if time.monotonic() > settle:
            break
        time.sleep(0.05)
    client.ping()  # kept open: the agent waits on it for the next request
    top_up_rx(vmm, client)
    _wait_idle(vmm)
    _start_polling(client)
    return client


#: What a restored copy counts as the template's last run before the pause (kernel patch
#: 0009): the rest of its gap is sleep, and only the timers due in this window fire at once,
#: not all those of the next 10 s (slab reaping, vmstat: ~30,000 emulated instructions before
#: its first request here). The worker polls with the tick on (every 40 ms), so no clock reader
#: has seen a longer delta. A host that holds the vCPU off for longer before the snapshot only
#: costs the benefit (that stretch is taken for the pause and the 10 s put back), never a step
#: back. The template VM is discarded after the snapshot, and each restored copy's first
#: update puts the 10 s back.
SNAPSHOT_RUN_MS = 200
_SNAPSHOT_RUN = f"""
def _ember_snapshot_run():
    try:
        with open("/proc/sys/kernel/ember_snapshot_run_ms", "w") as f:
            f.write("{SNAPSHOT_RUN_MS}")
    except FileNotFoundError:  # a kernel without it: restores credit 10 s
        pass
_ember_snapshot_run()
del _ember_snapshot_run
"""


def _start_polling(client: AgentClient) -> None:
    """Leave the run_code worker polling its code ring (ember.agent.codering) when the
    snapshot is taken: every restored sandbox then answers its first run_code from user
    space, with no guest-kernel wake-up. Last, after the guest went idle (the polling vCPU
    never will), and with a pause for the vsock reply's last packets to settle. The same
    request tells the guest kernel that the pause comes within :data:`SNAPSHOT_RUN_MS`."""
    result = client.run_code(_SNAPSHOT_RUN, timeout=WARM_TIMEOUT_S, linger=POLL_LINGER_S)
    if result.error is not None:
        raise SandboxError(f"the template's code worker failed: {result.error}")
    time.sleep(POLL_SETTLE_S)


# The guest kernel's first TCP connection costs ~3.4 s of emulated kernel time here
# (one-time set-up such as net_get_random_once's code patching): pay it once, in
# the template, over loopback, for TCP and UDP; the worker keeps no trace of it.
_WARM_SOCKETS = """
def _ember_warm():
    import socket
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname(), timeout=60) as c:
            listener.accept()[0].close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        u.sendto(b"x", u.getsockname())
        u.recv(1)
_ember_warm()
del _ember_warm
"""


# The common commands' binaries and libraries, read into the page cache for every restored
# copy (ember.agent.pagecache: a command's first run otherwise reads them from the disk).
_WARM_PAGE_CACHE = """
def _ember_warm_page_cache():
    from ember.agent import pagecache
    return tuple(pagecache.warm(pagecache.files_of()))
_ember_warm_page_cache()
"""


def _warm_guest_kernel(client: AgentClient) -> None:
    result = client.run_code(_WARM_SOCKETS, timeout=WARM_TIMEOUT_S)
    if result.error is not None:
        raise SandboxError(f"warming the template's network stack failed: {result.error}")
    result = client.run_code(_WARM_PAGE_CACHE, timeout=WARM_TIMEOUT_S)
    if result.error is not None:
        raise SandboxError(f"warming the template's page cache failed: {result.error}")


def rx_buffers(vmm: VmmProcess) -> tuple[int, int] | None:
    """The vsock receive buffers the guest has posted and not had filled yet, and how many its
    queue holds (None: a VMM that does not count them)."""
    vsock = vmm.control("status").get("devices", {}).get("Vsock", {})
    left, size = vsock.get("rx_buffers"), vsock.get("rx_queue_size")
    if not isinstance(left, int) or not isinstance(size, int) or size <= 0:
        return None
    return left, size


def top_up_rx(vmm: VmmProcess, client: AgentClient) -> int:
    """Leave the guest's vsock receive queue nearly full in the snapshot; return the pings sent.

    Linux's driver refills that queue only when fewer than half of its buffers are left, and
    then all of them at once: ~150,000 emulated instructions (~0.15 s here) of skb and page
    allocation. A template built without care was snapshotted wherever its build left the
    count, so every restored sandbox paid the refill in one of its first requests (which one
    depended on the build: the second Python exec took 0.35-0.45 s where the first took 0.2,
    in one template the first). Pings use one buffer each: unless the queue is all but full,
    they go on until the driver refills it, here, once, so that every build leaves the same
    count and restored sandboxes have ~127 requests before theirs. Bounded by the queue's
    size: a driver that never refills just gets its pings."""
    found = rx_buffers(vmm)
    if found is None:
        return 0
    last, size = found
    if last >= size - RX_FULL_MARGIN:
        return 0
    for sent in range(1, size + 2):
        client.ping()
        found = rx_buffers(vmm)
        if found is None or found[0] > last:  # refilled (or no longer counted)
            return sent
        last = found[0]
    return size + 1


def _wait_idle(vmm: VmmProcess) -> None:
    """Until the guest stops working (its vCPUs use next to no CPU): a snapshot taken in the
    middle of guest work makes every restored copy redo the rest (~0.1 s here)."""

    def cpu() -> float:
        return float(sum(vmm.control("status")["vcpu_cpu_s"]))

    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = cpu()
    while time.monotonic() < deadline:
        time.sleep(IDLE_WINDOW_S)
        now = cpu()
        if now - last < IDLE_CPU_S:
            return
        last = now

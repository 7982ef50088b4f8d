"""The node agent: one detached Ray actor per KVM machine, owning that machine's daemon.

Why an actor around ``ember serve`` rather than sandboxes as actors: the daemon
already does everything a node must (sandboxes by id, TTLs, re-adoption, HTTP with
streams), so the agent only starts it, says where it is, and reports how full the
machine is.  Sandboxes never become Ray objects; their bytes go between the driver
and the daemon over HTTP (see :mod:`ember.ray.sandbox`).

The agent is named ``ember-node-<node id>`` and pinned to its node twice over: it
asks for a sliver of the ``ember_kvm`` custom resource (only machines with KVM
advertise it) and a hard ``NodeAffinitySchedulingStrategy``, so Ray can never move
it elsewhere.  It runs the daemon under :mod:`ember.ray.supervise` (its own state
directory and a free port on the node's IP), which stops the daemon and destroys its
sandboxes when the agent dies in any way.

Capacity is reported, not guessed: free memory from /proc/meminfo, live sandboxes
from the daemon's ``/health``, CPUs, the templates in its store, plus slots reserved
by creations in flight, so two drivers placing at once cannot both take a node's last
slot.  The agent pushes it to the registry (every :data:`PUSH_S` and after each
reservation), so placement reads one snapshot instead of calling every node.

Templates travel between agents: one serves its store's files by chunks
(:meth:`NodeAgent.template_manifest`, :meth:`NodeAgent.read_template`) and another pulls
them into its own store (:meth:`NodeAgent.pull_template`), verified before they are
usable (:mod:`.transfer`).  Through Ray rather than the daemon's HTTP API: it is
agent-to-agent traffic, rare and bounded (a few MiB objects in flight), and the
daemon's API is for sandboxes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ember import templates
from ember.errors import EmberError, SandboxError
from ember.ray import transfer
from ember.ray.placement import Capacity, NodeInfo, mem_available_mib
from ember.ray.registry import NAMESPACE, actor, ray_nodes, registry
from ember.snapshot import STATE_FILE
from ember.spec import SandboxSpec

RESOURCE = "ember_kvm"  # the custom resource a KVM machine advertises (`ray start --resources`)
START_TIMEOUT_S = 180.0  # the daemon's start, on a busy host
RESERVE_TTL_S = 300.0  # a reservation never released (its driver died) expires
DEFAULT_RESERVE_MIB = 256  # memory left to the host
PUSH_S = 1.0  # capacity pushed to the registry this often (and after every reservation)
PULL_WINDOW = 4  # template chunks in flight from a peer (each up to transfer.CHUNK)
CHUNK_TIMEOUT_S = 120.0


def agent_name(node_id: str) -> str:
    return f"ember-node-{node_id}"


def default_state_dir(node_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ember" / "ray" / node_id[:16]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@actor(num_cpus=0, max_restarts=0, max_concurrency=16)
class NodeAgent:
    """One node's daemon and capacity (see the module docstring)."""

    def __init__(
        self, state_dir: str | None = None, max_sandboxes: int | None = None,
        reserve_mib: int = DEFAULT_RESERVE_MIB, templates_dir: str | None = None,
    ) -> None:  # fmt: skip
        self.node_id = str(ray.get_runtime_context().get_node_id())
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(self.node_id)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_sandboxes = max_sandboxes
        self.reserve_mib = reserve_mib
        self._reserved: dict[str, tuple[int, float]] = {}  # ticket -> (mem_mib, taken at)
        self._lock = threading.RLock()  # reserve() reads capacity() under it
        host: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        listen = f"{host}:{_free_port(host)}"
        self.url = f"http://{listen}"
        self.log = self.state_dir / "daemon.log"
        env = dict(os.environ)
        if templates_dir:  # the daemon's store is the one this agent serves and fills
            env[templates.TEMPLATES_ENV] = templates_dir
        self.templates_root = Path(templates_dir) if templates_dir else templates.templates_root()
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ember.ray.supervise", "--state-dir", str(self.state_dir),
                 "--listen", listen],
                stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True, env=env,
            )  # fmt: skip
        self.token = self._wait_started()
        self._http = httpx.Client(base_url=self.url, timeout=30.0,
                                  headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
        self.info = NodeInfo(self.node_id, agent_name(self.node_id), self.url, self.token,
                             os.cpu_count() or 1)  # fmt: skip
        self._stopped = threading.Event()
        self._registry: Any = None
        self._pusher = threading.Thread(target=self._push_loop, name="ember-push", daemon=True)
        self._pusher.start()

    def _wait_started(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        token_file = self.state_dir / "token"
        while True:
            if self._proc.poll() is not None:
                raise SandboxError(f"the node's daemon exited: {self._log_tail()}")
            try:
                token = token_file.read_text().strip()
                reply = httpx.get(f"{self.url}/health", timeout=5.0,
                                  headers={"Authorization": f"Bearer {token}"})  # fmt: skip
                if token and reply.status_code == 200:
                    return token
            except (OSError, httpx.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise SandboxError(f"the node's daemon did not start: {self._log_tail()}")
            time.sleep(0.2)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    # --- what drivers ask
    def ping(self) -> str:
        return self.node_id

    def node(self) -> NodeInfo:
        return self.info

    def capacity(self) -> Capacity:
        counts = self._http.get("/health").json()["sandboxes"]
        now = time.monotonic()
        with self._lock:
            for ticket, (_mib, taken) in list(self._reserved.items()):
                if now - taken > RESERVE_TTL_S:
                    del self._reserved[ticket]
            reserved = len(self._reserved)
            reserved_mib = sum(mib for mib, _ in self._reserved.values())
        return Capacity(
            node=self.info,
            mem_available_mib=mem_available_mib(Path("/proc/meminfo").read_text()),
            sandboxes=int(counts.get("running", 0)) + int(counts.get("paused", 0)),
            reserved=reserved, reserved_mib=reserved_mib,
            max_sandboxes=self.max_sandboxes, reserve_mib=self.reserve_mib,
            templates=tuple(self.templates()),
        )  # fmt: skip

    def push(self, wait: bool = True) -> None:
        """Report :meth:`capacity` to the registry now (and, with ``wait``, until it has it)."""
        if self._registry is None:
            self._registry = registry()
        ref = self._registry.report.remote(self.capacity())
        if wait:
            ray.get(ref)

    def _push_loop(self) -> None:
        while not self._stopped.wait(PUSH_S):
            try:
                self.push()
            except Exception:  # the daemon or the registry is restarting: next time
                self._registry = None

    def reserve(self, mem_mib: int) -> str | None:
        """A slot for one creation (a ticket to :meth:`release` once it is made or failed),
        or None if the node is full now."""
        with self._lock:
            if not self.capacity().fits(mem_mib):
                return None
            ticket = uuid.uuid4().hex
            self._reserved[ticket] = (mem_mib, time.monotonic())
        self.push(wait=False)  # for other drivers placing now; this one holds the ticket
        return ticket

    def release(self, ticket: str) -> None:
        """Give the slot back (the sandbox is made, so the daemon counts it now, or it
        failed); pushed before returning, so the driver's next placement sees it."""
        with self._lock:
            self._reserved.pop(ticket, None)
        self.push()

    # --- templates
    def templates(self) -> list[str]:
        """The templates in this node's store (directory names: ``sci``, ``default-<key>``)."""
        root = self.templates_root
        if not root.is_dir():
            return []
        return sorted(d.name for d in root.iterdir()
                      if not d.name.startswith(".") and (d / STATE_FILE).is_file())  # fmt: skip

    def _template(self, name: str) -> Path:
        if name not in self.templates():  # also refuses paths: only names listed here
            raise SandboxError(f"node {self.node_id[:12]} has no template {name!r}")
        return self.templates_root / name

    def template_manifest(self, name: str) -> transfer.Manifest:
        return transfer.manifest(self._template(name))

    def read_template(self, name: str, file: str, offset: int, length: int) -> bytes:
        return transfer.read_chunk(self._template(name), file, offset, length)

    def pull_template(self, name: str, source: Any) -> str:
        """Copy template ``name`` from ``source`` (a node agent, or anything answering
        ``template_manifest`` and ``read_template``) into this node's store, verified;
        its content hash.  A copy that does not match raises and leaves nothing."""
        manifest: transfer.Manifest = ray.get(source.template_manifest.remote(name),
                                              timeout=CHUNK_TIMEOUT_S)  # fmt: skip
        if manifest.template != name:  # a peer answering for another template
            raise transfer.TransferError(f"asked for template {name!r}, sent {manifest.template!r}")

        def fetch(wanted: list[tuple[str, int, int]]) -> Iterator[bytes]:
            pending = iter(wanted)
            window: deque[Any] = deque()
            for request in pending:
                window.append(source.read_template.remote(name, *request))
                if len(window) >= PULL_WINDOW:
                    yield ray.get(window.popleft(), timeout=CHUNK_TIMEOUT_S)
            while window:
                yield ray.get(window.popleft(), timeout=CHUNK_TIMEOUT_S)

        transfer.receive(self.templates_root, manifest, fetch)
        self.push()
        return manifest.digest

    def ensure_template(self, name: str) -> str | None:
        """Template ``name`` in this node's store, copied from a node that has it if it is
        missing: the node it came from (``self`` if it was here), None if no node has it."""
        if name in self.templates():
            return self.node_id
        caps: list[Capacity] = ray.get(registry().capacities.remote())
        sources = [c.node for c in caps if name in c.templates and c.node.node_id != self.node_id]
        failure: Exception | None = None
        for node in sources:
            try:
                self.pull_template(name, agent(node))
                return node.node_id
            except Exception as exc:  # that peer is gone or sent bad bytes: the next one
                failure = exc
        if failure is not None:
            raise failure
        return None

    def ensure_default(self) -> str | None:
        """:meth:`ensure_template` for the default template of a default sandbox (its
        directory name is a hash of this node's images): a node that joins gets a copy
        from a peer in seconds rather than building it (~10 minutes here) on first use."""
        try:
            name = templates.template_dir(templates.DEFAULT, SandboxSpec()).name
        except EmberError:  # this node has no images yet: the daemon will say so
            return None
        return self.ensure_template(name)

    def stop(self) -> None:
        """Stop the daemon and destroy its sandboxes (the supervisor's EOF path)."""
        self._stopped.set()
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._http.close()


def _kvm_nodes(resource: str) -> list[str]:
    return [str(n["NodeID"]) for n in ray_nodes()
            if n.get("Alive") and n.get("Resources", {}).get(resource, 0) > 0]  # fmt: skip


def start_nodes(
    *, resource: str = RESOURCE, state_dir: str | None = None,
    max_sandboxes: int | None = None, reserve_mib: int = DEFAULT_RESERVE_MIB,
    templates_dir: str | None = None,
) -> list[NodeInfo]:  # fmt: skip
    """A node agent on every live node that advertises ``resource`` (those running already
    are kept), each registered with the registry.  ``state_dir`` and ``templates_dir`` are
    bases: each node uses ``<base>/<node id>`` (without ``templates_dir``, the host's
    template cache; give it when several simulated nodes share one host).  A node lacking
    the default template gets a verified copy from one that has it before this returns.
    Safe to call from several drivers at once."""
    reg = registry()
    agents = []
    for node_id in _kvm_nodes(resource):
        node_state = str(Path(state_dir) / node_id[:16]) if state_dir else None
        node_templates = str(Path(templates_dir) / node_id[:16]) if templates_dir else None
        agents.append(NodeAgent.options(  # type: ignore[attr-defined]
            name=agent_name(node_id), namespace=NAMESPACE, lifetime="detached",
            get_if_exists=True, resources={resource: 0.001},
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(node_state, max_sandboxes, reserve_mib, node_templates))  # fmt: skip
    infos: list[NodeInfo] = ray.get([a.node.remote() for a in agents])
    ray.get([reg.add_node.remote(info) for info in infos])
    ray.get([a.push.remote() for a in agents])  # placement can use them at once
    ray.get([a.ensure_default.remote() for a in agents])
    return infos


def agent(node: NodeInfo) -> Any:
    return ray.get_actor(node.agent, namespace=NAMESPACE)


def pushed() -> list[Capacity]:
    """The capacities the node agents last pushed to the registry (placement's view: one
    call, at most a second old; each node's ``reserve`` checks it again)."""
    found: list[Capacity] = ray.get(registry().capacities.remote())
    return found


def nodes(*, timeout: float = 10.0) -> list[Capacity]:
    """Every registered node that answers within ``timeout``, with its capacity now (one
    call per node: for status and tests; placement uses :func:`pushed`)."""
    infos: list[NodeInfo] = ray.get(registry().nodes.remote())
    refs = []
    for info in infos:
        try:
            refs.append(agent(info).capacity.remote())
        except ValueError:  # its agent is gone; the registry's watcher will drop it
            continue
    if not refs:
        return []
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    found: list[Capacity] = []
    for ref in ready:
        try:
            found.append(ray.get(ref))
        except ray.exceptions.RayError:
            continue
    return found


def stop_nodes() -> None:
    """Stop every registered node agent, destroying its sandboxes (then the registry)."""
    reg = registry()
    for info in ray.get(reg.nodes.remote()):
        try:
            handle = agent(info)
            ray.get(handle.stop.remote(), timeout=START_TIMEOUT_S)
            ray.kill(handle)
        except (ValueError, ray.exceptions.RayError):
            pass
        ray.get(reg.remove_node.remote(info.node_id))
    ray.kill(reg)

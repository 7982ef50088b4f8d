"""The cluster's registry: which node holds which sandbox, and which nodes are alive.

One named, detached actor (``ember-registry`` in namespace ``ember``), pinned to the
head node so that it outlives any worker node, shared by every driver: a sandbox made
by one process can be found by id from another (``ember.ray.connect``).

It only *routes*.  The truth about a sandbox (its state, its metadata, its timeout)
lives in the daemon of its node; a lookup that misses is answered by asking the
nodes.  So a registry that restarts empty costs lookups, not sandboxes.

Capacity is pushed here: each node agent reports its own every second and after each
reservation, so placing a sandbox costs one call for the snapshot of every node rather
than one call per node (the node's own ``reserve`` still has the last word).

Forgetting is prompt, from two sides: a watcher thread compares the nodes it knows
with Ray's live nodes every :data:`WATCH_S`, and a client that finds a node's daemon
unreachable calls :meth:`Registry.suspect`, which pings that node's agent and drops
the node (and every sandbox on it) when the agent does not answer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ember.ray.placement import Capacity, NodeInfo

NAMESPACE = "ember"
NAME = "ember-registry"
WATCH_S = 1.0
STALE_S = 5.0  # a capacity pushed longer ago than this is not used for placement
PING_TIMEOUT_S = 5.0  # an agent that takes longer is treated as gone
actor: Any = ray.remote  # Ray's stubs do not know actor options such as max_concurrency


def ray_nodes() -> list[dict[str, Any]]:
    """``ray.nodes()``, typed (every node the GCS knows, dead ones with Alive False)."""
    found: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return found


@dataclass(frozen=True)
class Placed:
    """One sandbox's entry: where it is and what it was made with."""

    id: str
    node_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0


@actor(num_cpus=0, max_concurrency=16)
class Registry:
    """Sandbox id -> node, and the live node agents (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeInfo] = {}
        self._sandboxes: dict[str, Placed] = {}
        self._capacity: dict[str, tuple[Capacity, float]] = {}  # node id -> (pushed, when)
        self._watcher = threading.Thread(target=self._watch, name="ember-registry", daemon=True)
        self._watcher.start()

    # --- nodes
    def add_node(self, node: NodeInfo) -> None:
        with self._lock:
            self._nodes[node.node_id] = node

    def nodes(self) -> list[NodeInfo]:
        with self._lock:
            return list(self._nodes.values())

    def remove_node(self, node_id: str) -> list[str]:
        """Forget a node and its sandboxes; the ids forgotten."""
        with self._lock:
            self._nodes.pop(node_id, None)
            self._capacity.pop(node_id, None)
            gone = [s for s, p in self._sandboxes.items() if p.node_id == node_id]
            for sandbox_id in gone:
                del self._sandboxes[sandbox_id]
        return gone

    # --- capacity, pushed by the agents
    def report(self, capacity: Capacity) -> None:
        """A node agent's capacity now (every :data:`~ember.ray.node.PUSH_S` and after each
        reservation); a node not registered (or removed) is not brought back by it."""
        with self._lock:
            if capacity.node.node_id in self._nodes:
                self._capacity[capacity.node.node_id] = (capacity, time.monotonic())

    def capacities(self) -> list[Capacity]:
        """The last capacity each live node pushed, if recent: placement's snapshot, one
        call whatever the number of nodes."""
        now = time.monotonic()
        with self._lock:
            return [c for c, when in self._capacity.values() if now - when <= STALE_S]

    def suspect(self, node_id: str) -> bool:
        """A client could not reach ``node_id``'s daemon: is its agent still there?  A
        node whose agent does not answer is removed; True if it was."""
        with self._lock:
            node = self._nodes.get(node_id)
        if node is None:
            return True
        if self._agent_alive(node):
            return False
        self.remove_node(node_id)
        return True

    # --- sandboxes
    def record(self, placed: Placed) -> None:
        with self._lock:
            if placed.node_id in self._nodes:
                self._sandboxes[placed.id] = placed

    def forget(self, sandbox_id: str) -> None:
        with self._lock:
            self._sandboxes.pop(sandbox_id, None)

    def lookup(self, sandbox_id: str) -> tuple[Placed, NodeInfo] | None:
        with self._lock:
            placed = self._sandboxes.get(sandbox_id)
            node = self._nodes.get(placed.node_id) if placed is not None else None
        return (placed, node) if placed is not None and node is not None else None

    def find(self, metadata: dict[str, str] | None = None) -> list[Placed]:
        want = (metadata or {}).items()
        with self._lock:
            return [p for p in self._sandboxes.values() if want <= p.metadata.items()]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            per_node = {n: 0 for n in self._nodes}
            for p in self._sandboxes.values():
                per_node[p.node_id] = per_node.get(p.node_id, 0) + 1
        return {"nodes": len(per_node), "sandboxes": sum(per_node.values()), "per_node": per_node}

    # --- liveness
    def _agent_alive(self, node: NodeInfo) -> bool:
        try:
            agent = ray.get_actor(node.agent, namespace=NAMESPACE)
            ray.get(agent.ping.remote(), timeout=PING_TIMEOUT_S)
        except Exception:  # ValueError (no such actor), RayActorError, GetTimeoutError
            return False
        return True

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_S)
            try:
                alive = {n["NodeID"] for n in ray_nodes() if n.get("Alive")}
            except Exception:
                continue
            for node in self.nodes():
                if node.node_id not in alive:
                    self.remove_node(node.node_id)


def head_node_id() -> str:
    """The head node (where the GCS runs, so a registry there lives as long as the
    cluster), else the caller's own node."""
    for n in ray_nodes():
        if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {}):
            return str(n["NodeID"])
    return str(ray.get_runtime_context().get_node_id())


def registry() -> Any:
    """The cluster's registry actor, made on first use (by whichever driver comes first)."""
    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        pass
    return Registry.options(  # type: ignore[attr-defined]
        name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(head_node_id(), soft=False),
    ).remote()  # fmt: skip

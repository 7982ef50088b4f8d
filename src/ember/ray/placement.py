"""Where a new sandbox goes: the nodes' capacities in, an order of preference out.

Pure functions on plain dataclasses (no Ray, no I/O), so the policy is unit-tested
on its own and the same records travel between actors and drivers (Ray pickles them).

A node has room when it is under its sandbox limit (live sandboxes plus slots
reserved by creations in flight) and its free memory, less what the reservations
will take and a reserve kept for the host, still fits the new guest. ``spread``
prefers the emptiest node (fewest sandboxes, then most free memory): failures and
noisy neighbours hit fewer sandboxes. ``pack`` prefers the fullest node that still
has room: idle nodes stay empty, so an autoscaler can take them away.  Either way a
node that already has the sandbox's template comes before one that lacks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["spread", "pack"]
STRATEGIES: tuple[Strategy, ...] = ("spread", "pack")


@dataclass(frozen=True)
class NodeInfo:
    """How to reach one node's daemon; fixed for the life of its node agent."""

    node_id: str  # Ray's node id (hex)
    agent: str  # the node agent's actor name (in namespace NAMESPACE)
    url: str  # the node's `ember serve`
    token: str  # its bearer token (travels inside the cluster only)
    cpus: int


@dataclass(frozen=True)
class Capacity:
    """A node's load as its agent sees it now."""

    node: NodeInfo
    mem_available_mib: int  # /proc/meminfo MemAvailable
    sandboxes: int  # live (running or paused) in its daemon
    reserved: int  # creations in flight (slots taken by reserve(), not yet released)
    reserved_mib: int  # the memory those will take
    max_sandboxes: int | None  # None: memory is the only limit
    reserve_mib: int  # memory kept free for the host
    templates: tuple[str, ...] = ()  # the templates in its store (directory names)

    @property
    def load(self) -> int:
        return self.sandboxes + self.reserved

    def fits(self, mem_mib: int) -> bool:
        if self.max_sandboxes is not None and self.load >= self.max_sandboxes:
            return False
        free = self.mem_available_mib - self.reserved_mib - self.reserve_mib
        return free >= mem_mib


def rank(
    capacities: list[Capacity], mem_mib: int, strategy: Strategy = "spread",
    template: str | None = None,
) -> list[Capacity]:  # fmt: skip
    """The nodes with room for a ``mem_mib`` guest, best first; with ``template``, those
    that have it before those that would first copy it (a copy is seconds of I/O, and
    a node that lacks it everywhere would have to build it)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"placement={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    room = [c for c in capacities if c.fits(mem_mib)]
    free = [c.mem_available_mib - c.reserved_mib for c in room]
    keyed = list(zip(room, free, strict=True))
    if strategy == "spread":
        keyed.sort(key=lambda cf: (cf[0].load, -cf[1], cf[0].node.node_id))
    else:
        keyed.sort(key=lambda cf: (-cf[0].load, cf[1], cf[0].node.node_id))
    ranked = [c for c, _ in keyed]
    if template is not None:
        ranked.sort(key=lambda c: template not in c.templates)  # stable: policy order kept
    return ranked


def mem_available_mib(meminfo: str) -> int:
    """``MemAvailable`` of a /proc/meminfo text, in MiB (the kernel's estimate of what
    can be allocated without swapping: page cache counts as free, unlike MemFree)."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise ValueError("no MemAvailable in /proc/meminfo")

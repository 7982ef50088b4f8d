"""Ember on Ray: one pool of sandboxes across many KVM machines.

::

    import ember.ray

    with ember.ray.Sandbox(metadata={"job": "42"}) as sb:     # on the least loaded node
        print(sb.exec(["uname", "-n"]).stdout)

    sb = ember.ray.connect(sandbox_id)                        # from any driver in the cluster

Each Ray node with the ``ember_kvm`` resource runs a node agent (:mod:`.node`) that owns
that machine's ``ember serve``; a registry actor (:mod:`.registry`) maps sandbox ids to
nodes; :mod:`.sandbox` places sandboxes and talks to the node's daemon over HTTP
directly (the README's "Ember on Ray" says why).

Names are imported on first use, as in ``ember`` itself: ``python -m
ember.ray.supervise`` (the process that runs a node's daemon) must not pay for
importing Ray, and ``ember`` itself never imports this package (an import-linter
contract holds it to that), so Ray stays an optional extra: ``pip install 'ember[ray]'``.
"""

import builtins
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.ray.aio import AsyncSandbox, connect_async
    from ember.ray.node import NodeAgent, nodes, start_nodes, stop_nodes
    from ember.ray.placement import Capacity, NodeInfo
    from ember.ray.registry import Registry
    from ember.ray.sandbox import Sandbox, connect, kill, list

_LAZY: dict[str, str] = {
    "AsyncSandbox": "ember.ray.aio",
    "Capacity": "ember.ray.placement",
    "NodeAgent": "ember.ray.node",
    "NodeInfo": "ember.ray.placement",
    "Registry": "ember.ray.registry",
    "Sandbox": "ember.ray.sandbox",
    "connect": "ember.ray.sandbox",
    "connect_async": "ember.ray.aio",
    "kill": "ember.ray.sandbox",
    "list": "ember.ray.sandbox",
    "nodes": "ember.ray.node",
    "start_nodes": "ember.ray.node",
    "stop_nodes": "ember.ray.node",
}

__all__ = [
    "AsyncSandbox",
    "Capacity",
    "NodeAgent",
    "NodeInfo",
    "Registry",
    "Sandbox",
    "connect",
    "connect_async",
    "kill",
    "list",
    "nodes",
    "start_nodes",
    "stop_nodes",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ember.ray' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> builtins.list[str]:
    return sorted(set(globals()) | set(__all__))

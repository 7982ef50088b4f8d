"""What ``ember cluster`` does once Ray may be imported (:mod:`ember.cli.cluster` parses).

``status`` asks every node agent for its capacity now (one call each: an admin view,
exact, where placement reads the snapshot the agents push) and the registry for its
count.  ``placed_sandbox`` is the sandbox ``ember cluster run`` runs in: an
``ember.ray.Sandbox`` with ``ember run``'s options, on the node placement picks.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import ray

from ember.errors import ConfigError
from ember.ray.node import nodes
from ember.ray.registry import registry
from ember.ray.sandbox import Sandbox


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[None]:
    """This process as a driver of the cluster at ``address`` (None: the
    ``$RAY_ADDRESS`` or local one), quietly: Ray's own logs stay out of the command's
    output."""
    try:
        ray.init(address=address or "auto", logging_level=logging.ERROR,
                 log_to_driver=False)  # fmt: skip
    except ConnectionError as exc:
        raise ConfigError(
            f"no Ray cluster at {address or 'auto'}: {exc} (start one with "
            "`ray start --head --resources='{\"ember_kvm\": 1}'`, or pass --address)"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def status(*, as_json: bool) -> int:
    caps = sorted(nodes(), key=lambda c: c.node.node_id)
    stats = ray.get(registry().stats.remote())
    if as_json:
        for c in caps:
            print(json.dumps({"node": c.node.node_id, "url": c.node.url, "cpus": c.node.cpus,
                              "mem_available_mib": c.mem_available_mib,
                              "sandboxes": c.sandboxes, "reserved": c.reserved,
                              "max_sandboxes": c.max_sandboxes,
                              "templates": list(c.templates)}))  # fmt: skip
        return 0
    print(f"{'NODE':<14} {'URL':<24} {'CPUS':>4} {'FREE MiB':>9} {'SANDBOXES':>9} {'MAX':>5}  "
          "TEMPLATES")  # fmt: skip
    for c in caps:
        limit = "-" if c.max_sandboxes is None else str(c.max_sandboxes)
        print(f"{c.node.node_id[:12]:<14} {c.node.url:<24} {c.node.cpus:>4} "
              f"{c.mem_available_mib:>9} {c.sandboxes:>9} {limit:>5}  "
              f"{', '.join(c.templates) or '-'}")  # fmt: skip
    print(f"{len(caps)} nodes answering, {stats['nodes']} registered; "
          f"{stats['sandboxes']} sandboxes in the registry")  # fmt: skip
    return 0


@contextlib.contextmanager
def placed_sandbox(options: dict[str, Any]) -> Iterator[Sandbox]:
    """A fresh sandbox on the node with room (``ember run``'s ``Sandbox()`` keywords),
    destroyed after."""
    options = dict(options)
    if options.pop("boot", False):
        raise ConfigError("--boot is not available on a cluster (a node's daemon restores)")
    sb = Sandbox(**options, metadata={"ember": "cluster run"})
    try:
        yield sb
    finally:
        sb.close()

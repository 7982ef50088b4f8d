"""``python -m ember.ray status``: the cluster's Ember nodes, their capacity and sandboxes.

A module rather than an ``ember cluster`` subcommand because nothing in Ember may import
``ember.ray`` (Ray is an optional extra; an import-linter contract holds it), the CLI
included.  ``--address`` is Ray's (default: ``$RAY_ADDRESS``, else the local cluster).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import ray

from ember.ray.node import nodes
from ember.ray.registry import registry


def status(as_json: bool) -> int:
    caps = sorted(nodes(), key=lambda c: c.node.node_id)
    stats = ray.get(registry().stats.remote())
    if as_json:
        for c in caps:
            print(json.dumps({"node": c.node.node_id, "url": c.node.url, "cpus": c.node.cpus,
                              "mem_available_mib": c.mem_available_mib,
                              "sandboxes": c.sandboxes, "reserved": c.reserved,
                              "max_sandboxes": c.max_sandboxes}))  # fmt: skip
        return 0
    print(f"{'NODE':<14} {'URL':<24} {'CPUS':>4} {'FREE MiB':>9} {'SANDBOXES':>9} {'MAX':>5}")
    for c in caps:
        limit = "-" if c.max_sandboxes is None else str(c.max_sandboxes)
        print(f"{c.node.node_id[:12]:<14} {c.node.url:<24} {c.node.cpus:>4} "
              f"{c.mem_available_mib:>9} {c.sandboxes:>9} {limit:>5}")  # fmt: skip
    print(f"{len(caps)} nodes answering, {stats['nodes']} registered; "
          f"{stats['sandboxes']} sandboxes in the registry")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.ray")
    parser.add_argument("command", choices=["status"])
    parser.add_argument("--address", default=None, help="the Ray cluster (default: auto)")
    parser.add_argument("--json", action="store_true", help="one JSON object per node")
    args = parser.parse_args(argv)
    ray.init(address=args.address or "auto", logging_level=logging.ERROR, log_to_driver=False)
    try:
        return status(args.json)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

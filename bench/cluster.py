"""Ember on Ray: what placing through the cluster costs, beside a node's daemon and in-process.

Usage: ``.venv/bin/python bench/cluster.py [--sandboxes 20] [--live 6] [--runs 30] [--json]``
(issue 19's size: ``--sandboxes 200``; several minutes here)

Starts its own two-node ``ray.cluster_utils.Cluster`` on this machine (each node with an
``ember_kvm`` resource, a node agent and an ``ember serve`` of its own, in a temporary
state dir) and measures, each beside its peers from the same run:

- creating ``--sandboxes`` sandboxes, at most ``--live`` alive at once (made one after
  another in waves, then closed): ``ember.ray.Sandbox()`` (capacity of every node, a
  slot reserved on the best, ``POST /sandboxes`` on it, the registry told) against
  ``Sandbox(server=URL)`` on one node's daemon and the in-process ``Sandbox()``;
  creations per second and the median of one creation, and how the cluster's spread them
  over the two nodes;
- an ``exec(["true"])`` and a ``run_code("1")`` round trip in a live sandbox, the same
  three ways (the cluster's path is the node's HTTP API, so it should match ``server=``);
- one Ray actor call that does nothing (``agent.ping``): the floor of any data path
  through actor calls, for the README's "which data path" numbers.

Medians; ratios over in-process.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from _common import fmt_num, fmt_ratio, format_table, ratio, to_json
from ray.cluster_utils import Cluster

import ember.ray
from ember import Sandbox
from ember.ray.node import agent

NODE_ARGS: dict[str, Any] = {
    "num_cpus": 1, "resources": {"ember_kvm": 1}, "object_store_memory": 80 << 20,
}  # fmt: skip


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def creations(make: Callable[[], Sandbox], total: int, live: int) -> tuple[float, list[float]]:
    """``total`` sandboxes made in waves of ``live``: (creations per second, each's seconds)."""
    each: list[float] = []
    made = 0
    while made < total:
        wave: list[Sandbox] = []
        try:
            for _ in range(min(live, total - made)):
                t = time.perf_counter()
                wave.append(make())
                each.append(time.perf_counter() - t)
                made += 1
        finally:
            for sb in wave:
                sb.close()
    return len(each) / sum(each), each


def round_trips(sb: Sandbox, runs: int) -> tuple[float, float]:
    """Median seconds of ``exec(["true"])`` and of ``run_code("1")``."""
    sb.exec(["true"])
    sb.run_code("1")  # warm both paths
    execs = [timed(lambda: sb.exec(["true"])) for _ in range(runs)]
    codes = [timed(lambda: sb.run_code("1")) for _ in range(runs)]
    return statistics.median(execs), statistics.median(codes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sandboxes", type=int, default=20)
    parser.add_argument("--live", type=int, default=6, help="sandboxes alive at once, at most")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ember-bench-cluster-"))
    cluster = Cluster(initialize_head=True, head_node_args=NODE_ARGS)
    results: dict[str, dict[str, Any]] = {}
    try:
        cluster.add_node(**NODE_ARGS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="ember-bench", log_to_driver=False)
        nodes = ember.ray.start_nodes(state_dir=str(tmp / "nodes"))
        node = nodes[0]
        os.environ["EMBER_TOKEN"] = node.token  # for Sandbox(server=node.url)
        os.environ.pop("EMBER_SERVER", None)

        placed: collections.Counter[str] = collections.Counter()

        def cluster_sb() -> Sandbox:
            sb = ember.ray.Sandbox()
            placed[sb.node.node_id[:8]] += 1
            return sb

        def server_sb() -> Sandbox:
            return Sandbox(server=node.url)

        def local_sb() -> Sandbox:
            return Sandbox(server="")

        for name, make in (("cluster", cluster_sb), ("server", server_sb), ("local", local_sb)):
            make().close()  # warm: the template's pages, the daemons' imports
            placed.clear()
            rate, each = creations(make, args.sandboxes, args.live)
            spread_over = dict(placed)
            with make() as sb:
                exec_s, code_s = round_trips(sb, args.runs)
            results[name] = {"creations_per_s": rate, "create_s": statistics.median(each),
                             "exec_s": exec_s, "run_code_s": code_s}  # fmt: skip
            if name == "cluster":
                results[name]["per_node"] = spread_over
        handle = agent(node)
        ray.get(handle.ping.remote())
        ping = statistics.median(
            timed(lambda: ray.get(handle.ping.remote())) for _ in range(args.runs)
        )
        results["actor_call"] = {"ping_s": ping}
        ember.ray.stop_nodes()
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]
        shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        print(to_json({"args": vars(args), "results": results}))
        return 0
    c, s, loc = results["cluster"], results["server"], results["local"]
    rows = []
    for key, label, scale, unit in (
        ("creations_per_s", "creations/s", 1.0, ""),
        ("create_s", "create, median", 1000.0, " ms"),
        ("exec_s", "exec(['true']) round trip", 1000.0, " ms"),
        ("run_code_s", "run_code('1') round trip", 1000.0, " ms"),
    ):
        rows.append([label, fmt_num(c[key] * scale) + unit, fmt_num(s[key] * scale) + unit,
                     fmt_num(loc[key] * scale) + unit, fmt_ratio(ratio(c[key], loc[key])),
                     fmt_ratio(ratio(c[key], s[key]))])  # fmt: skip
    print(f"{args.sandboxes} sandboxes per column ({args.live} alive at most), two nodes on "
          f"this host; medians of {args.runs} round trips")  # fmt: skip
    headers = ["", "ember.ray", "server=URL", "in-process", "ray/local", "ray/server"]
    print(format_table(headers, rows))
    print(f"one Ray actor call (agent.ping, no work): {fmt_num(ping * 1000)} ms")
    spread = ", ".join(f"{node}: {n}" for node, n in sorted(c["per_node"].items()))
    print(f"ember.ray placed its {args.sandboxes} sandboxes: {spread}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

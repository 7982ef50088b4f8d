"""``ember cluster status`` and ``ember cluster run script.py``: Ember on a Ray cluster.

``status`` lists the cluster's Ember nodes (their daemon, capacity, and the templates in
each node's store); ``run`` is ``ember run`` on whichever node has room (the placement of
``ember.ray.Sandbox``), with the same options, output and exit status.

Ray is an optional extra and the rest of the CLI must start without it, so this module
imports :mod:`ember.ray.cli` only inside the two commands (the one exception the
import-linter contract "Ember never imports ember.ray" allows): ``ember run`` and every
other subcommand never load Ray.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.cli.run import common_options, run_script, sandbox_options


@dataclass(frozen=True)
class ClusterConfig:
    """Which Ray cluster: ``address`` as ``ray.init`` takes it (None: ``$RAY_ADDRESS``,
    else the cluster this machine belongs to)."""

    address: str | None


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "cluster",
        help="sandboxes on a Ray cluster (needs 'ember[ray]')",
        description="Ember's nodes on a Ray cluster: their status, or a script run on one.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = actions.add_parser(
        "status",
        help="nodes, capacity and templates",
        description="Each Ember node of the Ray cluster: its daemon, CPUs, free memory, "
        "sandboxes, limit and the templates it has.",
    )
    _address(status)
    status.add_argument("--json", action="store_true", help="one JSON object per node")
    status.set_defaults(func=_status)
    run = actions.add_parser(
        "run",
        help="run a Python script in a fresh sandbox on any node with room",
        description="As `ember run`, on the cluster node placement picks: copy SCRIPT into "
        "a fresh sandbox there, run it with python3, stream its output, exit with its status.",
    )
    _address(run)
    run.add_argument("script", type=Path)
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    common_options(run)
    run.set_defaults(func=_run)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address", default=None, metavar="ADDR",
        help="the Ray cluster (default: $RAY_ADDRESS, else the one this machine is in)",
    )  # fmt: skip


def config(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(address=args.address)


def _status(args: argparse.Namespace) -> int:
    from ember.ray.cli import connected, status  # Ray only for this command

    with connected(config(args).address):
        return status(as_json=args.json)


def _run(args: argparse.Namespace) -> int:
    from ember.ray.cli import connected, placed_sandbox

    with connected(config(args).address):
        return run_script(args, lambda a: placed_sandbox(sandbox_options(a)))

"""``python -m ember.ray status [--address A] [--json]``: what ``ember cluster status``
prints, kept for scripts written before that subcommand (this package may not import
the CLI, which sits above it)."""

from __future__ import annotations

import argparse
import sys

from ember.ray.cli import connected, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.ray")
    parser.add_argument("command", choices=["status"])
    parser.add_argument("--address", default=None, help="the Ray cluster (default: auto)")
    parser.add_argument("--json", action="store_true", help="one JSON object per node")
    args = parser.parse_args(argv)
    with connected(args.address):
        return status(as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())

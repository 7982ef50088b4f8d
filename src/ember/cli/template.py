"""``ember template``: build, list and remove the snapshots sandboxes are restored from."""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

from ember.errors import ConfigError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "template",
        help="build, list or remove sandbox templates",
        description="Templates are snapshots of a booted, warm sandbox; Sandbox() restores one.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="boot the default image and snapshot it")
    build.add_argument("name", nargs="?", default="default", help="template name (default)")
    build.add_argument("--mem", type=int, default=256, metavar="MiB", help="guest RAM")
    build.add_argument("--vcpus", type=int, default=1, metavar="N")
    build.add_argument("--force", action="store_true", help="rebuild even if it exists")
    build.add_argument(
        "--network",
        action="store_true",
        help="with a network device, for Sandbox(network=...) (built with networking off)",
    )
    build.set_defaults(func=_build)
    ls = actions.add_parser("ls", help="list templates")
    ls.set_defaults(func=_ls)
    rm = actions.add_parser("rm", help="remove a named template")
    rm.add_argument("name")
    rm.set_defaults(func=_rm)


def _build(args: argparse.Namespace) -> int:
    from ember import templates
    from ember.launcher import SandboxSpec
    from ember.network.policy import NetworkPolicy

    network = NetworkPolicy() if args.network else None  # the template's guest reaches nothing
    spec = SandboxSpec(mem_mib=args.mem, vcpus=args.vcpus, network=network)
    directory = templates.template_dir(args.name, spec)
    label = f"{args.name} (networked)" if args.network else args.name
    if directory.is_dir() and not args.force:
        templates.verify(directory)
        print(f"template {label}: {directory} (cached)")
        return 0
    started = time.monotonic()
    found = templates.build(args.name, spec)
    print(f"template {label}: {found.dir} (built in {time.monotonic() - started:.1f} s)")
    return 0


def _ls(args: argparse.Namespace) -> int:
    from ember import templates

    for found in templates.list_templates():
        size = sum(f.stat().st_blocks * 512 for f in found.dir.iterdir()) >> 20
        net = "network" if found.meta.get("network") else ""
        print(f"{found.name:<20} {size:>6} MiB  {net:<7}  {found.dir}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    from ember import templates

    directory = templates.templates_root() / templates.check_name(args.name)
    if not directory.is_dir():
        raise ConfigError(f"no template {args.name!r}")
    shutil.rmtree(directory)
    return 0

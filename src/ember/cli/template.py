"""``ember template``: build, list and remove the snapshots sandboxes are restored from.

``ember template build NAME --pip PKG... --requirements FILE --apt PKG...
--preload MOD...`` makes a template with packages: its root file system gets a
layer with them (built on the host, cached by a hash of what was asked for),
and its interpreters import numpy and the ``--preload`` modules before the
snapshot (see :mod:`ember.templates`). Building it again with the same inputs
is a cache hit; with other inputs it is rebuilt; ``--force`` rebuilds it and
re-resolves its packages. ``--pool N`` and ``--heap-mib N`` size a named template's
pre-started interpreters (the agent's options of the same names): fewer members build sooner
(each costs the emulated guest about a minute) and hold less guest memory; more serve more
execs at once before one falls back to a real ``python3``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from ember.cli import int_at_least
from ember.errors import ConfigError
from ember.spec import DEFAULT_MEM_MIB


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "template",
        help="build, list or remove sandbox templates",
        description="Templates are snapshots of a booted, warm sandbox; Sandbox() restores one.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="boot an image (with packages, if given) and snapshot it",
        description="Boot the default image, or one with the given packages, warm it and "
        "snapshot it as template NAME. Give NAME first: the package options take several "
        "values each.",
    )
    build.add_argument("name", nargs="?", default="default", help="template name (default)")
    build.add_argument("--mem", type=int, default=DEFAULT_MEM_MIB, metavar="MiB", help="guest RAM")
    build.add_argument("--vcpus", type=int, default=1, metavar="N")
    build.add_argument(
        "--force", action="store_true", help="rebuild even if it exists (and re-resolve --pip)"
    )
    build.add_argument(
        "--network",
        action="store_true",
        help="with a network device, for Sandbox(network=...) (built with networking off)",
    )
    build.add_argument(
        "--pip", action="extend", nargs="+", default=[], metavar="PKG",
        help="Python packages from PyPI (name, name==1.2) or local wheels, sdists, projects",
    )  # fmt: skip
    build.add_argument(
        "--requirements", "-r", action="append", default=[], type=Path, metavar="FILE",
        help="a pip requirements file (repeatable)",
    )  # fmt: skip
    build.add_argument(
        "--apt", action="extend", nargs="+", default=[], metavar="PKG",
        help="Debian 12 packages for the guest",
    )  # fmt: skip
    build.add_argument(
        "--preload", action="extend", nargs="+", default=[], metavar="MOD",
        help="modules the template's interpreters import before the snapshot (numpy always)",
    )  # fmt: skip
    build.add_argument(
        "--pool", type=int_at_least(0), metavar="N",
        help="pre-started python3 interpreters for exec (default 4; 0: none): the first two "
        "are started with a heap (about a minute of build each here), the rest forked from "
        "them and warmed (seconds each)",
    )  # fmt: skip
    build.add_argument(
        "--heap-mib", type=int_at_least(0), metavar="MiB",
        help="heap each warm interpreter touches before the snapshot (default 64; 0: none)",
    )  # fmt: skip
    build.set_defaults(func=_build)
    ls = actions.add_parser("ls", help="list templates")
    ls.set_defaults(func=_ls)
    rm = actions.add_parser("rm", help="remove a named template")
    rm.add_argument("name")
    rm.set_defaults(func=_rm)


def _build(args: argparse.Namespace) -> int:
    from ember import templates
    from ember.images.packages import PackageSpec, check_modules
    from ember.images.rich_progress import for_terminal
    from ember.network.policy import NetworkPolicy
    from ember.spec import SandboxSpec

    network = NetworkPolicy() if args.network else None  # the template's guest reaches nothing
    spec = SandboxSpec(mem_mib=args.mem, vcpus=args.vcpus, network=network, pool=args.pool,
                       heap_mib=args.heap_mib)  # fmt: skip
    if args.name == templates.DEFAULT and (args.pool is not None or args.heap_mib is not None):
        raise ConfigError(
            "the default template's interpreters are fixed (2, 64 MiB heaps): name the "
            "template, e.g. `ember template build lean --pool 1`, and use --template lean"
        )
    packages = PackageSpec(pip=tuple(args.pip), requirements=tuple(args.requirements),
                           apt=tuple(args.apt))  # fmt: skip
    preload = list(check_modules(m for arg in args.preload for m in arg.split(",") if m))
    with_packages = not packages.empty() or bool(preload)
    if with_packages:
        if args.name == templates.DEFAULT:
            raise ConfigError(
                "the default template's packages are fixed (numpy): name the template, "
                "e.g. `ember template build sci --pip pandas`"
            )
        spec = templates.package_spec_for(spec, packages, preload)
    directory = templates.template_dir(args.name, spec)
    label = f"{args.name} (networked)" if args.network else args.name
    if not args.force and templates.is_current(directory, spec):
        templates.verify(directory)
        print(f"template {label}: {directory} (cached)")
        return 0
    started, started_at = time.monotonic(), time.time()
    with for_terminal() as progress:
        if with_packages:
            found = templates.build_with_packages(
                args.name, spec, packages, preload, progress=progress, force_packages=args.force
            )
        else:
            found = templates.build(args.name, spec, progress=progress, force=args.force)
    if found.meta.get("created", started_at) < started_at:  # another build made it meanwhile
        print(f"template {label}: {found.dir} (cached: built by another process meanwhile)")
    else:
        print(f"template {label}: {found.dir} (built in {time.monotonic() - started:.1f} s)")
    return 0


def _ls(args: argparse.Namespace) -> int:
    from ember import templates

    for found in templates.list_templates():
        size = sum(f.stat().st_blocks * 512 for f in found.dir.iterdir()) >> 20
        net = "network" if found.meta.get("network") else ""
        packages = found.meta.get("packages") or {}
        extra = [*packages.get("pip", []), *(f"apt:{a}" for a in packages.get("apt", []))]
        extra += [f"-r {r}" for r in packages.get("requirements", [])]
        if found.meta.get("pool") is not None:  # --pool/--heap-mib: not the agent's defaults
            extra.append(f"pool {found.meta['pool']}")
        if found.meta.get("heap_mib") is not None:
            extra.append(f"heap {found.meta['heap_mib']} MiB")
        shown = ", ".join(extra) or "-"
        print(f"{found.name:<20} {size:>6} MiB  {net:<7}  {shown:<30}  {found.dir}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    from ember import templates

    directory = templates.templates_root() / templates.check_name(args.name)
    if not directory.is_dir():
        raise ConfigError(f"no template {args.name!r}")
    shutil.rmtree(directory)
    return 0

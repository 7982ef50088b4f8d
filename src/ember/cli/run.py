"""``ember run script.py`` and ``ember exec -- CMD``: one fresh sandbox, output streamed, then gone.

The exit status is the guest command's (128 + N when killed by signal N),
so shell scripts can use Ember like any other command.  Sandbox problems
(timeout, crash) print one line and exit 124 (timeout, as timeout(1)) or 1.

``ember run script.py`` executes ``python3 PATH ARGS`` with the script sent in the
same request (``exec(files=)``; one over 512 KiB is uploaded first): the guest agent
hands that command line to one of the template's pre-started interpreters
(ember.agent.pool), which runs it exactly as a new ``python3`` would, without the
seconds a new guest interpreter costs. Nothing here needs to know: a command the
pool cannot honour simply runs as a real process.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.cli import positive_seconds, runclient, runner
from ember.cli.runclient import SHAPE_DEFAULTS
from ember.errors import ConfigError

if TYPE_CHECKING:
    from ember.network.policy import NetworkPolicy
    from ember.sandbox import Sandbox

EXIT_TIMEOUT = runner.EXIT_TIMEOUT
EXIT_CRASH = runner.EXIT_CRASH
GUEST_DIR = runclient.GUEST_DIR


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout", type=positive_seconds, default=None, metavar="S", help="kill after S seconds"
    )
    p.add_argument(
        "--mem", type=int, default=SHAPE_DEFAULTS["mem_mib"], metavar="MiB",
        help="guest RAM (default: the launcher's, 512)",
    )  # fmt: skip
    p.add_argument("--vcpus", type=int, default=SHAPE_DEFAULTS["vcpus"], metavar="N")
    p.add_argument(
        "--cpus", type=float, default=SHAPE_DEFAULTS["cpus"], metavar="F",
        help="CPU quota for the sandbox's VMM, in CPUs (e.g. 0.5)",
    )  # fmt: skip
    p.add_argument(
        "--memory", type=int, default=SHAPE_DEFAULTS["memory_mib"], metavar="MiB",
        help="memory limit for the whole VMM; at least --mem + 64",
    )  # fmt: skip
    p.add_argument(
        "--pids", type=int, default=SHAPE_DEFAULTS["pids"], metavar="N",
        help="process/thread limit",
    )  # fmt: skip
    p.add_argument(
        "--template", default=SHAPE_DEFAULTS["template"], metavar="NAME",
        help="restore this template (default: the default template of --mem/--vcpus)",
    )  # fmt: skip
    p.add_argument("--boot", action="store_true", help="boot the image instead of restoring")
    p.add_argument(
        "--internet", action="store_true",
        help="networking on: the guest may reach public addresses (never the host or LAN)",
    )  # fmt: skip
    p.add_argument(
        "--allow", action="append", default=[], metavar="CIDR[:PORT[-PORT]]",
        help="networking on: the guest may reach this destination (repeatable)",
    )  # fmt: skip


def network_policy(args: argparse.Namespace) -> NetworkPolicy | None:
    """``--internet`` / ``--allow``: the sandbox's policy; None (no network) without them."""
    if not args.internet and not args.allow:
        return None
    from ember.network.policy import NetworkPolicy

    return NetworkPolicy(args.allow, internet=args.internet)


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run a Python script in a fresh sandbox",
        description="Copy SCRIPT into a fresh sandbox, run it with python3, stream its output, "
        "and exit with its exit status.",
    )
    run.add_argument("script", type=Path)
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    common_options(run)
    run.set_defaults(func=_run)
    exe = sub.add_parser(
        "exec",
        help="run a command in a fresh sandbox",
        description="Run CMD in a fresh sandbox, stream its output, exit with its status.",
    )
    common_options(exe)
    exe.add_argument(
        "--id", default=None, metavar="ID", help="run in this sandbox of an `ember serve` daemon"
    )
    exe.add_argument(
        "--server", default=None, metavar="URL",
        help="that daemon (default $EMBER_SERVER, else http://127.0.0.1:7777)",
    )  # fmt: skip
    exe.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    exe.set_defaults(func=_exec)


Opener = Callable[[argparse.Namespace], AbstractContextManager["Sandbox"]]


def _run(args: argparse.Namespace) -> int:
    return run_script(args, None)


def run_script(args: argparse.Namespace, opener: Opener | None) -> int:
    """``ember run``'s work in the sandbox ``opener`` gives (``ember cluster run`` passes one
    placed on a cluster node; None: the run daemon's, else a fresh one in this process):
    upload, stream, the script's exit status."""
    script: Path = args.script
    try:
        source = script.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {script}: {exc.strerror}") from None
    argv = runclient.script_command(script.name, list(args.args))
    return _in_sandbox(args, argv, upload=(argv[1], source), opener=opener)


def sandbox_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sandbox the options of :func:`common_options` ask for, as ``Sandbox()`` keywords."""
    from ember.spec import DEFAULT_MEM_MIB

    options = runner.shape_options(args)
    if options["mem_mib"] is None:
        options["mem_mib"] = DEFAULT_MEM_MIB
    return options | {"boot": args.boot, "network": network_policy(args)}


def _exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ConfigError("no command given: ember exec -- CMD [ARGS...]")
    return _in_sandbox(args, command, upload=None, opener=None)


@contextlib.contextmanager
def _sandbox(args: argparse.Namespace) -> Iterator[Sandbox]:
    """A fresh sandbox, destroyed afterwards; or (``--id``) a daemon's, left running."""
    if getattr(args, "id", None):
        from ember.cli.serve import server_url
        from ember.sandbox.remote import RemoteSandbox

        remote = RemoteSandbox.attach(args.id, server=server_url(args))
        try:
            yield remote
        finally:
            remote.detach()
        return
    from ember.sandbox import Sandbox

    with Sandbox(**sandbox_options(args)) as sb:
        yield sb


def _in_sandbox(
    args: argparse.Namespace, argv: list[str], upload: tuple[str, bytes] | None,
    opener: Opener | None,
) -> int:  # fmt: skip
    """Through the run daemon (:mod:`ember.cli.runner`) when it takes the run, else here."""
    if opener is None:
        code = runner.try_run(args, argv, upload)
        if code is not None:
            return code
        opener = _sandbox
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)  # noqa: E731
    return runner.execute(args, argv, upload, opener, sys.stdout.buffer, sys.stderr.buffer, say)

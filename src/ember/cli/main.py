"""Entry point of the `ember` console script.

Each subcommand lives in its own module exposing ``register(subparsers)``,
which adds its parser and sets ``func`` to a callable taking the parsed
arguments and returning the exit code.  Every :class:`ember.errors.EmberError`
becomes one line on stderr and exit status 2: users get the fix, not a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from ember.errors import EmberError

EXIT_USAGE = 2
# The modules that register subcommands, in the order ``ember --help`` lists them, and which
# module owns each subcommand: a command imports only its own module (``ember run`` does not
# pay ~100 ms for the image builder, the VMM's argument parser and the terminal client).
MODULES = ("boot", "cluster", "image", "run", "serve", "shell", "template")
OWNER = {
    "boot": "boot",
    "cluster": "cluster",
    "image": "image",
    "run": "run",
    "exec": "run",
    "serve": "serve",
    "ps": "serve",
    "kill": "serve",
    "logs": "serve",
    "mcp": "serve",
    "shell": "shell",
    "template": "template",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``command`` a known subcommand) one with only its module's."""
    parser = argparse.ArgumentParser(
        prog="ember", description="MicroVM sandboxes on KVM behind a hypervisor written in Python."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = (OWNER[command],) if command in OWNER else MODULES
    for name in modules:
        importlib.import_module(f"ember.cli.{name}").register(sub)
    return parser


def _prestart(argv: Sequence[str]) -> None:
    """``ember run``/``exec`` restore a template through the zygote, a Python that imports
    the VMM (~0.2 s): start it now, so that it imports while this process does."""
    if argv[:1] in (["run"], ["exec"]) and not {"--boot", "--id", "-h", "--help"} & set(argv):
        from ember.cli import runner

        if runner.enabled() and (runner.runner_dir() / runner.SOCKET).exists():
            return  # the run daemon will likely take it: no zygote needed here
        from ember.zygote import Zygote

        Zygote.get()


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    _prestart(words)
    args = build_parser(words[0] if words else None).parse_args(words)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EmberError as exc:
        print(f"ember: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

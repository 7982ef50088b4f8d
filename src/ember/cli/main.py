"""Entry point of the `ember` console script.

Each subcommand lives in its own module exposing ``register(subparsers)``,
which adds its parser and sets ``func`` to a callable taking the parsed
arguments and returning the exit code.  Every :class:`ember.errors.EmberError`
becomes one line on stderr and exit status 2: users get the fix, not a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import ember.cli.boot
import ember.cli.cluster
import ember.cli.image
import ember.cli.run
import ember.cli.serve
import ember.cli.shell
import ember.cli.template
from ember.errors import EmberError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ember", description="MicroVM sandboxes on KVM behind a hypervisor written in Python."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ember.cli.boot.register(sub)
    ember.cli.cluster.register(sub)
    ember.cli.image.register(sub)
    ember.cli.run.register(sub)
    ember.cli.serve.register(sub)
    ember.cli.shell.register(sub)
    ember.cli.template.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

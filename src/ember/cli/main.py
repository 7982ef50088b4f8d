"""Entry point of the `ember` console script.

Each subcommand lives in its own module exposing ``register(subparsers)``,
which adds its parser and sets ``func`` to a callable taking the parsed
arguments and returning the exit code.  Every :class:`ember.errors.EmberError`
becomes one line on stderr and exit status 2: users get the fix, not a
traceback.

``ember run``/``ember exec`` through a listening run daemon never get past
:func:`ember.cli.runclient.fast_main`: this module imports nothing else at the top,
so that such a run costs Python's start and one request, not the parser's imports.
"""

from __future__ import annotations

import contextlib
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator, Sequence

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
    import argparse
    import importlib

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
        import os

        from ember.cli import runclient

        if runclient.enabled() and os.path.exists(runclient.socket_path()):
            return  # the run daemon will likely take it: no zygote needed here
        from ember.zygote import Zygote

        Zygote.get()


@contextlib.contextmanager
def _unwind_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds the command as Ctrl-C does (its ``finally`` blocks close what it
    started; status 128 + 15) instead of ending the process where it stands: a cold boot's
    VMM (``ember template build``) runs in its own session without a death signal, and was
    left running when its CLI was killed. A handler already set (by an embedding
    application) is kept; commands that serve (the run daemon, ``ember serve``, the shell)
    install their own. The default comes back when the command returns: a process that calls
    :func:`main` and then forks (a test runner) must not hand its children a handler that
    raises ``SystemExit`` inside a copy of its own stack."""
    import signal
    import threading

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is unwind:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        from ember.cli import runclient

        code = runclient.fast_main(words)
        if code is not None:
            return code
    except KeyboardInterrupt:
        return 130
    from ember.errors import EmberError

    with _unwind_on_sigterm():
        _prestart(words)
        args = build_parser(words[0] if words else None).parse_args(words)
        try:
            return int(args.func(args))
        except EmberError as exc:
            print(f"ember: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())

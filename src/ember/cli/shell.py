"""``ember shell ID [-- CMD...]``: your terminal, wired to a terminal in a daemon's sandbox.

The local terminal goes into raw mode, so every key (^C, ^Z, arrows, ^D) reaches
the guest program as typed and the guest's line discipline does the rest, as
over ssh.  Its size is sent at start and again on each SIGWINCH.  Keys are read
by one thread, the output is written by the main one; a SIGWINCH (or the end)
wakes the key thread through a pipe rather than calling into the connection
from a signal handler, which may have interrupted the very call it would make.
The terminal mode is restored on every way out: the program's end, an error,
SIGTERM or SIGHUP.  A stdin that is not a terminal (a pipe, a file) is sent as
it is, then ^D; nothing is put in raw mode.  The exit status is the program's
(128 + N if a signal N ended it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from types import FrameType

from ember.cli.serve import server_url
from ember.client.terminal import Terminal

DEFAULT_SIZE = (24, 80)
_READ = 16 << 10


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    shell = sub.add_parser(
        "shell",
        help="an interactive terminal in a daemon's sandbox",
        description="Open a terminal in sandbox ID of the daemon (default: a login shell; "
        "after --: CMD instead) and wire it to this one. Exits with the program's status.",
    )
    shell.add_argument(
        "--server", default=None, metavar="URL",
        help="the daemon (default $EMBER_SERVER, else http://127.0.0.1:7777)",
    )  # fmt: skip
    shell.add_argument("id", metavar="ID")
    shell.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    shell.set_defaults(func=_shell)


def window_size() -> tuple[int, int]:
    """Rows and columns of whichever standard stream is a terminal, else 24x80."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.lines > 0 and size.columns > 0:
                return size.lines, size.columns
    return DEFAULT_SIZE


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """``fd``'s terminal in raw mode for the block, its old mode back however it ends."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _leave(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM or SIGHUP: unwind (restoring the terminal), status 128 + N."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals(winch_fd: int) -> Iterator[None]:
    """SIGWINCH noted on ``winch_fd`` (the signal module's wakeup fd); SIGTERM/SIGHUP unwind."""
    handlers = {
        signal.SIGWINCH: lambda _s, _f: None,  # the wakeup fd carries it; this only enables it
        signal.SIGTERM: _leave,
        signal.SIGHUP: _leave,
    }
    saved = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    old_fd = signal.set_wakeup_fd(winch_fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for signum, handler in saved.items():
            signal.signal(signum, handler)


class _Keys(threading.Thread):
    """Stdin to the terminal's keys; a byte on ``wakeup`` means a resize (or the end)."""

    def __init__(self, term: Terminal, stdin: int, wakeup: int, stop: int) -> None:
        super().__init__(name="ember-shell-keys", daemon=True)
        self.term, self.stdin, self.wakeup, self.stop = term, stdin, wakeup, stop

    def run(self) -> None:
        watched = [self.stdin, self.wakeup, self.stop]
        try:
            while True:
                ready = select.select(watched, [], [])[0]
                if self.stop in ready:
                    return
                if self.wakeup in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wakeup, 512)
                    self.term.resize(*window_size())
                if self.stdin in ready:
                    data = os.read(self.stdin, _READ)
                    if not data:  # a pipe or file ended (a raw terminal never says so)
                        self.term.send_eof()
                        watched.remove(self.stdin)
                    else:
                        self.term.write(data)
        except Exception:
            return  # the connection is gone: the main thread reports how it ended


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_shell(term: Terminal, stdin: int = 0, stdout: int = 1) -> int:
    """Relay ``term`` to and from the local terminal until its program ends: its status."""
    tty_in = os.isatty(stdin)
    wakeup_r, wakeup_w = os.pipe()
    stop_r, stop_w = os.pipe()
    for fd in (wakeup_r, wakeup_w):
        os.set_blocking(fd, False)
    keys = _Keys(term, stdin, wakeup_r, stop_r)
    try:
        with _signals(wakeup_w), raw_mode(stdin) if tty_in else contextlib.nullcontext():
            keys.start()
            os.write(wakeup_w, b"w")  # a resize between the terminal's start and now: sent
            for data in term:
                _write_all(stdout, data)
    finally:
        os.write(stop_w, b"x")
        if keys.is_alive():
            keys.join(1.0)
        if not keys.is_alive():  # else stuck in a send: its descriptors go with the process
            for fd in (wakeup_r, wakeup_w, stop_r, stop_w):
                os.close(fd)
    result = term.result
    assert result is not None
    if result.exit_code is not None:
        return result.exit_code
    return 128 + (result.signal or 0)


def _shell(args: argparse.Namespace) -> int:
    from ember.sandbox.remote import RemoteSandbox

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    sb = RemoteSandbox.attach(args.id, server=server_url(args))
    try:
        rows, cols = window_size()
        with sb.pty(cmd or None, rows=rows, cols=cols) as term:
            status = run_shell(term, sys.stdin.fileno(), sys.stdout.fileno())
    finally:
        sb.detach()
    return status

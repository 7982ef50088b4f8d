"""The run daemon: ``ember run``/``ember exec`` in a process that outlives the CLI.

Why: a new CLI process pays for what a long-lived one pays once. On this host, of
``ember run hello.py``'s ~0.6-0.75 s, ~0.2 s is Python importing the SDK and starting the
zygote (its own Python importing the VMM), and ~0.1 s more the restored guest's first
request (its first touch of every page the request uses). The daemon keeps the SDK
imported and two sandboxes of the default shape restored and warmed
(:func:`ember.sandbox.spares.keep_warm`; ``$EMBER_SPARES=1`` for every other shape it is
asked for), so ``ember run`` is a thin client: a Python with a socket
(:mod:`ember.cli.runclient`, which also holds the wire format's constants).

How: the first ``ember run``/``ember exec`` that finds no daemon starts one in the
background and runs in-process as before; the next ones send the daemon one JSON request
(argv, the script's bytes, the sandbox options, the timeout) on a Unix socket and print the
frames it sends back (stdout, stderr, then the exit status and a message for stderr, if
any). The daemon runs each request in a fresh sandbox exactly as the CLI would
(:func:`ember.cli.run.execute`) and sends the exit status before the sandbox is closed.
A client that goes away (Ctrl-C) makes the daemon close that sandbox, which kills the
command.

- **Where:** ``$EMBER_RUNNER_DIR`` (default ``~/.cache/ember/run``, mode 0700): ``run.sock``
  (0600), ``run.lock`` (held by the daemon, so two never serve one directory), ``run.log``.
- **Not used** with ``$EMBER_RUNNER=0``, ``$EMBER_SERVER`` set (the sandbox is a server's),
  ``--boot``, ``--internet``/``--allow`` (spares have no network), ``--id``, or a script over
  :data:`MAX_SCRIPT`: those run in-process.
- **Never stale:** each request carries a fingerprint of the installed ``ember`` package
  (its ``.py`` files' count, sizes and newest mtime); a daemon running other code answers
  "stale", exits, and the client runs in-process (and starts a new daemon).
- **Ends:** after :data:`IDLE_EXIT_S` without a request; its spares and zygote go with it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ember.cli import runclient
from ember.cli.runclient import (
    END,
    HEADER,
    MAX_SCRIPT,
    SOCKET,
    STALE,
    STDERR,
    STDOUT,
    enabled,
    fingerprint,
)
from ember.errors import SandboxCrashed, SandboxTimeout

LOCK = "run.lock"
LOG = "run.log"
IDLE_EXIT_S = 600.0
MAX_REQUEST = 2 * MAX_SCRIPT
DEFAULT_SPARES = 2  # of the default shape: back-to-back runs find one each


# --- shared


def runner_dir() -> Path:
    return Path(runclient.runner_dir())


def _send(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    sock.sendall(HEADER.pack(kind, len(payload)) + payload)


# --- running one command (in this process, or in the daemon for a client)

EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_CRASH = 1
Opener = Callable[[argparse.Namespace], contextlib.AbstractContextManager[Any]]


class _Output(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


def execute(
    args: argparse.Namespace, argv: list[str], upload: tuple[str, bytes] | None,
    opener: Opener, out: _Output, err: _Output, say: Callable[[str], None],
) -> int:  # fmt: skip
    """Run ``argv`` in the sandbox ``opener`` gives, its output to ``out``/``err``, a
    sandbox's failure as one line to ``say``: the exit status ``ember run`` exits with."""
    from ember.client.session import EXEC_FILES_MAX  # here: a thin client never needs it

    try:
        with opener(args) as sb:
            files = None
            if upload is not None and len(upload[1]) <= EXEC_FILES_MAX:
                files = {upload[0]: upload[1]}  # with the command: one round trip, not two
            elif upload is not None:
                sb.files.write(upload[0], upload[1])
            stream = sb.exec_stream(argv, timeout=args.timeout, files=files)
            while True:
                try:
                    chunk = next(stream)
                except StopIteration as stop:
                    result = stop.value
                    break
                target = out if chunk.stream == "stdout" else err
                target.write(chunk.data)
                target.flush()
    except SandboxTimeout:
        say(f"ember: the command ran longer than {args.timeout} s and was killed")
        return EXIT_TIMEOUT
    except SandboxCrashed as exc:
        say(f"ember: {exc}")
        return EXIT_CRASH
    if result is None:
        return EXIT_CRASH
    if result.signal is not None:
        return 128 + int(result.signal)
    return int(result.exit_code or 0)


# --- the client (ember run / ember exec)


# ``Sandbox()`` keyword <- the CLI option (ember.cli.run.common_options) that sets it: the
# sandbox's shape, what a run daemon may be asked for (``--mem`` unset is None here).
SHAPE = {"mem_mib": "mem", "vcpus": "vcpus", "cpus": "cpus", "memory_mib": "memory",
         "pids": "pids", "template": "template"}  # fmt: skip


def shape_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sandbox's shape from the CLI's options, as ``Sandbox()`` keywords."""
    return {keyword: getattr(args, option) for keyword, option in SHAPE.items()}


def daemon_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The sandbox options to send, or None when this run is not the daemon's to make."""
    if args.boot or args.internet or args.allow or getattr(args, "id", None):
        return None
    return shape_options(args)


def try_run(
    args: argparse.Namespace, argv: list[str], upload: tuple[str, bytes] | None
) -> int | None:
    """Run through the daemon and return the exit status; None: run in-process instead
    (no daemon, a stale one, or a run it does not take). Starts a daemon when none runs."""
    options = daemon_options(args)
    if not enabled() or options is None or (upload is not None and len(upload[1]) > MAX_SCRIPT):
        return None
    try:
        line = runclient.request(argv, options, args.timeout, upload)
        return runclient.send(line, sys.stdout.buffer, sys.stderr.buffer)
    except runclient.NotTaken as exc:
        if exc.restart:
            start_daemon()
        return None


def start_daemon() -> None:
    """Start a daemon in the background (it exits at once if another one holds the lock)."""
    directory = runner_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = open(directory / LOG, "ab")  # noqa: SIM115 - handed to the child
    except OSError:
        return
    import subprocess

    with log:
        subprocess.Popen(
            [sys.executable, "-m", "ember.cli.runner", str(directory)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True,
        )  # fmt: skip


# --- the daemon


class _Frames:
    """A binary stream whose writes go to the client as frames of one kind."""

    def __init__(self, sock: socket.socket, kind: bytes, lock: threading.Lock) -> None:
        self._sock, self._kind, self._lock = sock, kind, lock

    def write(self, data: bytes) -> int:
        with self._lock:
            _send(self._sock, self._kind, bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class Daemon:
    def __init__(self) -> None:
        self.fingerprint = fingerprint()
        self._busy = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def serve(self, listener: socket.socket) -> None:
        listener.settimeout(1.0)
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                with self._lock:
                    idle = not self._busy and time.monotonic() - self._last > IDLE_EXIT_S
                if idle:
                    return
                continue
            with self._lock:
                self._busy += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    self._run(conn)
                finally:
                    # The hang-up watcher may sit in recv on it: close() alone would wait
                    # for that, and the client would see no end until it did.
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
        except Exception as exc:  # a client that went away mid-run, a bad request
            print(f"ember run daemon: {exc!r}", file=sys.stderr, flush=True)
        finally:
            with self._lock:
                self._busy -= 1
                self._last = time.monotonic()

    def _run(self, conn: socket.socket) -> None:
        request = json.loads(_read_line(conn))
        if request.get("fingerprint") != self.fingerprint:
            _send(conn, STALE, b"")
            self._stop.set()  # a newer ember is installed: make way for its daemon
            return
        from ember.errors import EmberError

        upload = request.get("upload")
        if upload is not None:
            upload = (str(upload[0]), base64.b64decode(upload[1]))
        lock = threading.Lock()
        messages: list[str] = []
        args = argparse.Namespace(timeout=request.get("timeout"))
        opener = _opener(dict(request["options"]), conn)
        try:
            code = execute(
                args, list(request["argv"]), upload, opener,
                _Frames(conn, STDOUT, lock), _Frames(conn, STDERR, lock), messages.append,
            )  # fmt: skip
        except EmberError as exc:
            code, messages = 2, [f"ember: error: {exc}"]
        except Exception as exc:  # a bug, or a request the checks let through
            # The client waits for END: it must hear of this, not wait for ever.
            traceback.print_exc()  # the daemon's log
            code, messages = EXIT_CRASH, [f"ember: error: the run daemon failed: {exc!r}"]
        # Logged before the client hears of it: once its CLI process has exited, the log
        # already says so (the tests count these lines; they raced the END frame).
        print(f"ember run daemon: a run ended with status {code}", file=sys.stderr, flush=True)
        with lock:
            _send(conn, END, runclient.end_payload(code, "\n".join(messages)))


def _opener(options: dict[str, Any], conn: socket.socket) -> Opener:
    """Sandboxes for one request: closed off the client's path (after its exit status
    went out), or at once if the client hangs up first (which kills the command)."""

    @contextlib.contextmanager
    def sandbox(_args: argparse.Namespace) -> Iterator[Any]:
        from ember.sandbox import Sandbox

        unknown = set(options) - set(SHAPE)
        if unknown:
            raise ValueError(f"unknown sandbox options {sorted(unknown)}")
        given = {keyword: value for keyword, value in options.items() if value is not None}
        sb = Sandbox(**given, server="")  # an option not given (None) is Sandbox()'s default
        once = threading.Lock()
        done = threading.Event()

        def close() -> None:
            if once.acquire(blocking=False):
                sb.close()

        def hung_up() -> None:
            if not done.is_set():
                print("ember run daemon: the client hung up: closing its sandbox",
                      file=sys.stderr, flush=True)  # fmt: skip
            close()

        watcher = threading.Thread(target=_on_hang_up, args=(conn, hung_up), daemon=True)
        watcher.start()
        try:
            yield sb
        finally:
            done.set()
            threading.Thread(target=close, daemon=True).start()

    return sandbox


def _on_hang_up(conn: socket.socket, then: Callable[[], None]) -> None:
    with contextlib.suppress(OSError):
        while conn.recv(1):
            pass
    then()


def _read_line(conn: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the client hung up before its request")
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
    return bytes(data)


def main(directory: Path) -> int:
    """Serve ``directory`` until idle; exit at once if another daemon serves it."""
    import fcntl

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = open(directory / LOCK, "a+")  # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another daemon serves this directory
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    daemon = Daemon()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: daemon.stop())
    os.environ.setdefault("EMBER_SPARES", "1")  # each other shape asked for gets one
    from ember.sandbox.spares import keep_warm

    keep_warm(DEFAULT_SPARES)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = Path(runclient.socket_path(directory))
    temporary = path.with_name(f"{SOCKET}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    listener.bind(str(temporary))
    os.chmod(temporary, 0o600)
    ours = os.stat(temporary).st_ino
    listener.listen(64)
    os.replace(temporary, path)  # clients see a socket that accepts, or none
    print(f"ember run daemon {os.getpid()} serving {directory}", file=sys.stderr, flush=True)
    try:
        daemon.serve(listener)
    finally:
        # Unlinked first: a client connecting from now on fails and runs in-process; one
        # still in the backlog is reset by the close, before any frame, and does the same.
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ours:  # not a newer daemon's
                path.unlink()
        listener.close()
    return 0


def stop(directory: Path, timeout: float = 30.0) -> bool:
    """Stop the daemon serving ``directory`` (SIGTERM: it closes its spares and exits) and
    wait for it to be gone; True if none runs there now."""
    import fcntl

    try:
        lock = open(directory / LOCK, "a+")  # noqa: SIM115 - closed below
    except OSError:
        return True
    with lock:
        lock.seek(0)
        text = lock.read().strip()
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True  # nobody holds it
            except OSError:
                pass
            if text.isdigit():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(text), signal.SIGTERM)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

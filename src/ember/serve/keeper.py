"""The keeper: a zygote that outlives the daemon, so its sandboxes survive a daemon restart.

The SDK's zygote (:mod:`ember.zygote`) serves one host process over a
socketpair and exits with it, taking its VMMs along (``PR_SET_PDEATHSIG``).
A daemon must not take its sandboxes down when it is killed: its VMMs are
forked by this process instead, which listens on ``STATE_DIR/keeper.sock``
and serves any number of daemon connections one after the other, with the
zygote's own request format and spawn code.  It stays in its own session,
reaps its children (writing each exit status to the file the request named,
which :class:`ember.zygote.ZygoteChild` reads from any process), and exits
once no daemon is connected and no VMM of its own is left. Like the zygote, it keeps one
child forked ahead of the next jailed request (:mod:`ember.zygote_fork`), named
``ember-ahead``; it is not a VMM, and it goes with the keeper.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ember import zygote, zygote_fork
from ember.errors import SandboxError
from ember.vmm.config import ProcessConfig

SOCKET_NAME = "keeper.sock"
START_TIMEOUT = 60.0


def serve(path: Path) -> None:
    """Accept daemons on ``path`` and fork VMMs for them until nobody needs this process."""
    zygote._preload()
    zygote._libc.prctl(zygote.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)
    signal.set_wakeup_fd(write_end)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # only an empty keeper may go
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(8)
    exit_files: dict[int, str] = {}
    clients: dict[int, tuple[socket.socket, bytearray]] = {}
    gc.freeze()
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    poller.register(read_end, select.POLLIN)
    served = False
    ahead = zygote_fork.ForkAhead(None)  # as the zygote's (the child closes our sockets)
    while True:
        if served and not clients and not exit_files:
            break
        events = poller.poll(ahead.wait_s(1.0) * 1000)
        if not events:
            ahead.idle(exit_files)
        for fd, _event in events:
            if fd == read_end:
                with contextlib.suppress(BlockingIOError):
                    os.read(read_end, 4096)
                zygote._reap(exit_files)
            elif fd == listener.fileno():
                conn, _ = listener.accept()
                clients[conn.fileno()] = (conn, bytearray())
                poller.register(conn.fileno(), select.POLLIN)
                served = True
            elif fd in clients:
                _serve_client(fd, clients, poller, read_end, exit_files, ahead)
        zygote._reap(exit_files)  # a missed wake-up costs at most a second
    ahead.close()
    with contextlib.suppress(OSError):
        if path.exists() and os.stat(path).st_ino == os.fstat(listener.fileno()).st_ino:
            path.unlink()
    listener.close()


def _serve_client(
    fd: int,
    clients: dict[int, tuple[socket.socket, bytearray]],
    poller: select.poll,
    wakeup: int,
    exit_files: dict[int, str],
    ahead: zygote_fork.ForkAhead,
) -> None:
    """Serve what one daemon sent."""
    conn, buffer = clients[fd]
    try:
        data = conn.recv(65536)
    except OSError:
        data = b""
    if not data:
        poller.unregister(fd)
        del clients[fd]
        conn.close()
        return
    buffer += data
    while b"\n" in buffer:
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        reply = zygote._spawn(line, conn, wakeup, exit_files, ahead)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply).encode() + b"\n")


class _Liveness:
    """What :meth:`ember.zygote.Zygote.get` polls: a keeper never counts as exited here."""

    def poll(self) -> int | None:
        return None


class KeeperClient(zygote.Zygote):
    """The daemon's end: spawns through the keeper of ``state_dir`` (started if absent)."""

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / SOCKET_NAME
        self._log = state_dir / "keeper.log"
        self._lock = threading.Lock()
        self._buffer = b""
        self._proc = _Liveness()  # type: ignore[assignment]
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = self._try_connect()
        if sock is not None:
            return sock
        with self._log.open("ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "ember.serve.keeper", str(self._path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            sock = self._try_connect()
            if sock is not None:
                return sock
            time.sleep(0.05)
        raise SandboxError(f"the Ember keeper did not start: see {self._log}")

    def _try_connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            return None
        return sock

    def spawn(self, config: ProcessConfig, **kwargs: Any) -> zygote.ZygoteChild:
        try:
            return super().spawn(config, **kwargs)
        except SandboxError:
            # The keeper died (it never should): start another and try once more.
            with self._lock:
                self._sock.close()
                self._buffer = b""
                self._sock = self._connect()
            return super().spawn(config, **kwargs)

    def close(self) -> None:
        self._sock.close()

    @classmethod
    def install(cls, state_dir: Path) -> KeeperClient:
        """Make every VMM this process starts (Sandbox(), fork) a child of the keeper."""
        client = cls(state_dir)
        with zygote.Zygote._instance_lock:
            zygote.Zygote._instance = client
        return client


def keeper_pid(state_dir: Path) -> int | None:
    """The keeper's pid (the peer of a connection to its socket), None if none runs."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(state_dir / SOCKET_NAME))
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    finally:
        sock.close()
    return int.from_bytes(creds[:4], sys.byteorder)


def main() -> None:
    os.umask(0o077)
    serve(Path(sys.argv[1]))


if __name__ == "__main__":
    main()

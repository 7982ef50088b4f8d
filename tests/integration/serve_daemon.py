"""A real ``ember serve`` for the tests: its own state dir and a free port, in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.integration.conftest import ember_command
from tests.waiting import alive, wait_for

__all__ = ["Daemon", "alive", "free_port", "running_daemon", "wait_for"]

START_TIMEOUT = 120.0
#: The daemons this process started: a failing test's report ends with their logs' tails.
STARTED: list[Daemon] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Daemon:
    state_dir: Path
    port: int
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.state_dir.parent / f"daemon-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=120.0,
        )

    def start(self) -> None:
        argv = ember_command(
            "serve", "--listen", f"127.0.0.1:{self.port}", "--state-dir", str(self.state_dir),
            *self.extra,
        )  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("EMBER_SERVER", "EMBER_TOKEN")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        STARTED.append(self)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(OSError, httpx.TransportError):
                if self.client().get("/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def delete_all(self) -> None:
        with self.client() as c:
            for sb in c.get("/sandboxes").json()["sandboxes"]:
                c.delete(f"/sandboxes/{sb['id']}")


@contextlib.contextmanager
def running_daemon(tmp: Path, *extra: str) -> Iterator[Daemon]:
    """A daemon for the block; afterwards its sandboxes are deleted and it and its keeper
    are gone (the keeper leaves by itself once it has no VMM and no daemon)."""
    daemon = Daemon(tmp / "state", free_port(), extra)
    daemon.start()
    try:
        yield daemon
    finally:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.delete_all()
        finally:
            daemon.stop()

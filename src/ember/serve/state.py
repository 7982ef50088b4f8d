"""The daemon's state directory: its token, and one record per sandbox it owns.

::

    STATE_DIR/          mode 0700
      token             the bearer token (0600), made at first start
      keeper.sock       the keeper (VMMs' parent, see .keeper)
      sandboxes/ID.json one record per sandbox: what a restarted daemon needs to re-adopt it
      paused/ID/        a paused sandbox's snapshot (state + sparse memory), until resumed

A record is written (atomically) once its sandbox is up, rewritten when its
lifetime changes, and removed when it is deleted; a record whose VMM is gone
is a crash to report.  Nothing in it comes from a client but metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ember.sandbox.wire import TOKEN_NAME

RECORDS = "sandboxes"
ID_PREFIX = "sb-"


def new_id() -> str:
    """An unguessable sandbox id (128 random bits)."""
    return ID_PREFIX + secrets.token_urlsafe(16)


def valid_id(sandbox_id: str) -> bool:
    body = sandbox_id[len(ID_PREFIX) :]
    return (
        sandbox_id.startswith(ID_PREFIX)
        and 0 < len(body) <= 64
        and all(c.isalnum() or c in "-_" for c in body)
    )


@dataclass
class Record:
    """What a daemon knows of one sandbox, on disk as JSON."""

    id: str
    dir: str  # the VMM's private directory (sockets, console, jail root)
    pid: int  # the VMM, a child of the keeper
    template: str
    created_at: float
    spec: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    expires_at: float | None = None  # wall clock; None: no timeout
    cgroup: dict[str, Any] | None = None  # {"version": 2, "dirs": {"": "/sys/fs/cgroup/..."}}
    paused: bool = False  # snapshotted to STATE_DIR/paused/ID, no VMM (dir and pid unused)
    idle_timeout: float | None = None  # seconds without an API call; None: never idle
    on_timeout: str = "kill"  # or "pause": what expires_at and idle_timeout do
    # A networked sandbox's namespace slot and exposed ports (its policy is in ``spec``),
    # so that a restarted daemon takes them over and a resumed one exposes them again.
    network: dict[str, Any] | None = None


class StateDir:
    """The files of one daemon's state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = path / RECORDS
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
        self.records.mkdir(exist_ok=True, mode=0o700)

    def token(self, token_file: Path | None = None) -> str:
        """The token in ``token_file`` (default: ``STATE_DIR/token``), made on first use."""
        path = token_file or self.path / TOKEN_NAME
        with contextlib.suppress(FileNotFoundError):
            token = path.read_text().strip()
            if token:
                return token
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token

    def paused_dir(self, sandbox_id: str) -> Path:
        return self.path / "paused" / sandbox_id

    def save(self, record: Record) -> None:
        path = self.records / f"{record.id}.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(record), f)
        os.replace(tmp, path)

    def remove(self, sandbox_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.records / f"{sandbox_id}.json").unlink()

    def load_all(self) -> list[Record]:
        """Every readable record (a torn or foreign file is skipped and removed)."""
        found: list[Record] = []
        for path in sorted(self.records.glob("*.json")):
            try:
                found.append(Record(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                path.unlink(missing_ok=True)
        return found

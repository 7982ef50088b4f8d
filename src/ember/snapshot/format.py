"""The ``state`` file: a fixed header, then JSON.

Header (little endian): magic ``EMBERSNP``, u32 format version, u32 flags
(0), the SHA-256 of the payload, u64 payload length.  The payload is JSON;
KVM structs inside it are base64 of their raw bytes, since the VMM only
saves and restores them.  A file from another format version, a truncated
one or one whose checksum does not match is refused with a message that
says so: restoring a half-written VM would corrupt the guest silently.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, TypeVar

from ember.errors import SnapshotError

MAGIC = b"EMBERSNP"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sII32sQ")
MAX_STATE_BYTES = 64 << 20  # far above any real state; a bigger file is not ours

_S = TypeVar("_S", bound=ctypes.Structure)


def blob(struct_value: ctypes.Structure) -> str:
    """A KVM struct as text for the JSON payload."""
    return base64.b64encode(bytes(struct_value)).decode("ascii")


def unblob(kind: type[_S], text: str) -> _S:
    """The struct back; a blob of the wrong size is a corrupted (or foreign) snapshot."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise SnapshotError(f"snapshot state has a malformed {kind.__name__}") from None
    if len(raw) != ctypes.sizeof(kind):
        raise SnapshotError(
            f"snapshot state has a {kind.__name__} of {len(raw)} bytes, "
            f"expected {ctypes.sizeof(kind)}"
        )
    return kind.from_buffer_copy(raw)


def encode(state: dict[str, Any]) -> bytes:
    payload = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, digest, len(payload)) + payload


def decode(data: bytes, where: str = "snapshot state") -> dict[str, Any]:
    if len(data) < _HEADER.size or not data.startswith(MAGIC):
        raise SnapshotError(f"{where} is not an Ember snapshot (bad magic)")
    _magic, version, _flags, digest, length = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"{where} has snapshot format version {version}; this Ember reads version "
            f"{FORMAT_VERSION}: rebuild it (ember template build)"
        )
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise SnapshotError(
            f"{where} is truncated or padded: {len(payload)} payload bytes, header says {length}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{where} is corrupted: its checksum does not match")
    try:
        state = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{where} has an unreadable payload: {exc}") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{where} has an unreadable payload: not an object")
    return state


def write_state(fd: int, state: dict[str, Any], *, durable: bool = True) -> None:
    """Write the state into an open, empty file (the caller renames it into place)."""
    data = encode(state)
    os.ftruncate(fd, 0)
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], written)
    if durable:
        os.fsync(fd)


def read_state(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_STATE_BYTES:
            raise SnapshotError(f"{path} is {size} bytes: not an Ember snapshot state")
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot state at {path}") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot state {path}: {exc.strerror}") from None
    return decode(data, str(path))

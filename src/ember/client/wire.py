"""The agent protocol's frames as the host reads them: headers, JSON, ERROR frames.

Sans-IO: nothing here touches a socket. The transports (:mod:`ember.client.blocking`,
:mod:`ember.client.aio`) read the bytes; this module says what they mean. The guest
is untrusted, so everything it sends is checked here and anything malformed becomes
:class:`~ember.errors.ProtocolError` (the host's only one: see :mod:`ember.errors`),
never a ``RecursionError``, a ``KeyError`` or a wrong-typed value in user code.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO

from ember import protocol
from ember.errors import AgentError, ProtocolError, agent_error
from ember.protocol import CHUNK_SIZE, HEADER, MAX_FRAME, Kind, Payload

__all__ = [
    "MAX_JSON_DEPTH",
    "Frame",
    "Source",
    "check_result",
    "cut_short",
    "data_chunks",
    "decode",
    "frame_header",
    "parse_header",
    "remote_error",
    "unexpected",
]

Frame = tuple[Kind, bytes]
Source = bytes | bytearray | memoryview | BinaryIO

MAX_JSON_DEPTH = 32
"""Nesting deeper than any answer has (they are 3 deep): refused, so that no deep object
from the guest ever reaches ``repr`` or user code."""


def parse_header(header: bytes) -> tuple[Kind, int]:
    """A frame header's kind and payload length, both checked (by the guest's own parser,
    whose error becomes the host's :class:`~ember.errors.ProtocolError`)."""
    try:
        return protocol.parse_header(header)
    except protocol.ProtocolError as exc:
        raise ProtocolError(str(exc)) from None


def cut_short(missing: int) -> ProtocolError:
    """The peer hung up ``missing`` bytes before the end of a frame."""
    return ProtocolError(f"connection closed {missing} bytes short of a frame's end")


def frame_header(kind: Kind, payload: Payload) -> tuple[bytes, memoryview]:
    """The header to send before ``payload``, and the payload as bytes (checked for size)."""
    view = memoryview(payload).cast("B")
    if view.nbytes > MAX_FRAME:
        raise ProtocolError(f"refusing to send a {view.nbytes}-byte frame (limit {MAX_FRAME})")
    return HEADER.pack(view.nbytes, kind), view


def data_chunks(data: Source) -> Iterator[bytes | memoryview]:
    """Cut upload data into frame-sized pieces without copying bytes-like input."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, CHUNK_SIZE):
            yield view[start : start + CHUNK_SIZE]
        return
    while chunk := data.read(CHUNK_SIZE):
        yield chunk


def source_size(data: Source) -> int | None:
    """How many bytes :func:`data_chunks` will yield, when that is known up front: bytes-like
    input, or a regular file read from its current offset. The agent sizes the file it writes
    from it (``agent/files.py``); it is a hint, and the bytes sent are what counts."""
    if isinstance(data, bytes | bytearray | memoryview):
        return memoryview(data).nbytes
    try:
        st = os.fstat(data.fileno())
        return max(0, st.st_size - data.tell()) if stat.S_ISREG(st.st_mode) else None
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def decode(payload: bytes) -> dict[str, Any]:
    """A JSON object from the guest, or :class:`ProtocolError`: nothing else escapes.

    The guest picks the bytes, so a frame of ``[[[[...`` (``RecursionError`` in
    the parser), ``NaN``/``Infinity`` and nesting deeper than any answer has are
    refused here rather than surfacing later in user code.
    """
    try:
        obj = json.loads(payload, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError("the agent's answer is JSON nested too deeply to parse") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    if _deeper_than(obj, MAX_JSON_DEPTH):
        raise ProtocolError(f"the agent's answer nests deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number the agent may send")


def _deeper_than(obj: dict[str, Any], limit: int) -> bool:
    """Whether containers nest more than ``limit`` deep (iteratively: no recursion)."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def remote_error(payload: bytes) -> AgentError:
    """The :class:`AgentError` an ERROR frame stands for."""
    obj = decode(payload)
    type_name, message = obj.get("type"), obj.get("message")
    if not isinstance(type_name, str) or not isinstance(message, str):
        raise ProtocolError(f"malformed ERROR frame: {obj!r:.200}")
    return agent_error(type_name, message)


def unexpected(frame: Frame | None, op: str) -> ProtocolError:
    """The error for an answer that fits no rule of ``op`` (EOF included)."""
    if frame is None:
        return ProtocolError(
            f"the agent closed the connection before answering {op!r}; "
            "the guest may have crashed or be shutting down"
        )
    return ProtocolError(f"unexpected {frame[0].name} frame in the answer to {op!r}")


def check_result(frame: Frame | None, op: str) -> dict[str, Any]:
    """A RESULT's JSON; an ERROR raises the matching AgentError."""
    if frame is not None and frame[0] is Kind.RESULT:
        return decode(frame[1])
    if frame is not None and frame[0] is Kind.ERROR:
        raise remote_error(frame[1])
    raise unexpected(frame, op)

"""A cell's output on its way out of the run_code worker: captured (up to a limit),
streamed as it is written, and fit into one frame.

Split from :mod:`ember.agent.worker`, which runs the cells. Runs in the guest: standard
library only.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ember.protocol import CHUNK_SIZE, MAX_FRAME, Kind, ProtocolError, encode_json, write_frame

if TYPE_CHECKING:
    from ember.agent.worker import Interrupt

__all__ = ["CAPTURE_LIMIT", "STREAM_BUFFER", "fit"]

CAPTURE_LIMIT = 256 << 10
STREAM_BUFFER = 16 << 10  # a streamed cell's output waits for a newline up to this


class _Capture(io.TextIOBase):
    """A write-only text stream that keeps the first ``limit`` characters."""

    def __init__(
        self, limit: int = CAPTURE_LIMIT, emit: Callable[[str | None], None] | None = None
    ) -> None:
        super().__init__()
        self._emit = emit  # a streamed call: each write also goes to the host at once
        self._parts: list[str] = []
        self._room = limit
        self._dropped = 0

    encoding = "utf-8"  # code that consults sys.stdout.encoding expects a real one

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        kept = s[: self._room] if self._room > 0 else ""
        if kept:
            self._parts.append(kept)
            self._room -= len(kept)
        self._dropped += len(s) - len(kept)
        if self._emit is not None and s:
            self._emit(s)
        return len(s)

    def flush(self) -> None:
        if self._emit is not None:
            self._emit(None)  # print(..., flush=True): send what is pending now

    def getvalue(self) -> str:
        text = "".join(self._parts)
        if self._dropped:
            text += f"\n[... {self._dropped} more characters not captured]"
        return text


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters cut]"


def fit(result: dict[str, Any], limit: int = MAX_FRAME - 4096) -> bytes:
    """Encode ``result``, halving its longest texts until it fits in a frame."""
    payload = encode_json(result)
    while len(payload) > limit:
        holders: list[tuple[dict[str, Any], str]] = [(result, k) for k in ("stdout", "stderr")]
        holders.append((result, "value"))
        if result.get("error"):
            holders += [(result["error"], k) for k in ("message", "traceback")]
        shrunk = False
        for holder, key in holders:
            text = holder.get(key)
            if isinstance(text, str) and len(text) > 256:
                holder[key] = _clip(text, len(text) // 2)
                shrunk = True
        if not shrunk:
            break  # cannot happen: five texts of ≤256 characters are far below a frame
        payload = encode_json(result)
    return payload


class _Streamer:
    """A streamed cell's output, sent to the agent as STDOUT/STDERR frames as it is written.

    Line-buffered: ``print`` writes the text and the newline separately, and each frame
    costs the guest a vsock packet (~6 ms), so pieces are sent at a newline, a flush,
    a switch of stream (which keeps the order), past :data:`STREAM_BUFFER`, or at the
    cell's end. Called from inside the cell's ``print``: a failure to send (the agent
    is gone) must not become the cell's exception, so the first one turns streaming off.
    """

    def __init__(self, sock: socket.socket, interrupt: Interrupt | None = None) -> None:
        self._sock = sock
        self._interrupt = interrupt  # held off while a frame is being written
        self._broken = False
        self._kind = Kind.STDOUT
        self._pending: list[str] = []
        self._size = 0

    def __call__(self, kind: Kind, text: str | None) -> None:
        """``text`` None: send what is pending."""
        if self._broken:
            return
        if self._pending and (text is None or kind is not self._kind):
            self._send()
        if text:
            self._kind = kind
            self._pending.append(text)
            self._size += len(text)
            if "\n" in text or self._size >= STREAM_BUFFER:
                self._send()

    def _send(self) -> None:
        interrupt = self._interrupt
        if interrupt is not None:
            interrupt.shielded += 1
        try:
            data = "".join(self._pending).encode("utf-8", "replace")
            self._pending.clear()
            self._size = 0
            for start in range(0, len(data), CHUNK_SIZE):
                write_frame(self._sock, self._kind, data[start : start + CHUNK_SIZE])
        except (OSError, ProtocolError):
            self._broken = True
        finally:
            if interrupt is not None:
                interrupt.unshield()  # an interrupt held meanwhile is raised here, in the cell


def _error_result(type_name: str, message: str) -> dict[str, Any]:
    error = {"type": type_name, "message": message, "traceback": ""}
    return {"stdout": "", "stderr": "", "value": None, "error": error}

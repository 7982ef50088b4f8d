"""The two long-lived operations, as sans-IO state machines: a terminal and a watch.

Unlike the ops of :mod:`ember.client.core`, these stay open for as long as the caller
likes and are fed by the caller's own loop (``Terminal.read``, iterating a ``Watch``),
so they only say what each frame means; their transports live in
:mod:`ember.client.terminal` and :mod:`ember.client.watch`.
"""

from __future__ import annotations

from typing import Any

from ember.client import results
from ember.client.bounds import CallBounds
from ember.client.core import Operation
from ember.client.results import ExecResult, FileEvent, OutputChunk
from ember.client.wire import Frame, check_result, decode, remote_error, unexpected
from ember.errors import ProtocolError, SandboxTimeout
from ember.protocol import Kind, encode_json

__all__ = ["TerminalOp", "WatchOp", "pty_request", "resize_payload", "signal_payload"]


def pty_request(
    argv: list[str] | None,
    *,
    rows: int,
    cols: int,
    env: dict[str, str] | None,
    cwd: str | None,
    timeout: float | None,
) -> dict[str, Any]:
    """A ``pty`` REQUEST (``argv`` None: the guest's login shell)."""
    if not (0 < rows <= 10_000 and 0 < cols <= 10_000):
        raise ValueError(f"a terminal of {rows}x{cols} is not one the guest accepts")
    request: dict[str, Any] = {"op": "pty", "rows": rows, "cols": cols}
    for key, value in (("argv", argv), ("env", env), ("cwd", cwd), ("timeout", timeout)):
        if value is not None:
            request[key] = value
    return request


def resize_payload(rows: int, cols: int) -> bytes:
    if not (0 < rows <= 10_000 and 0 < cols <= 10_000):
        raise ValueError(f"a terminal of {rows}x{cols} is not one the guest accepts")
    return encode_json({"rows": rows, "cols": cols})


def signal_payload(signum: int) -> bytes:
    if not 0 < int(signum) < 65:
        raise ValueError(f"{signum} is not a signal number")
    return encode_json({"signal": int(signum)})


class TerminalOp(Operation[ExecResult]):
    """``pty``: STDOUT frames (what the terminal shows) as events, then RESULT, as ``exec``.

    ``result`` is the program's end (its output is not kept here: it was the events).
    With a ``timeout`` the agent ends the program; the host gives up ``grace`` later.
    """

    def __init__(self, request: dict[str, Any], bounds: CallBounds) -> None:
        super().__init__(request, bounds)
        self.result: ExecResult | None = None

    def start(self) -> None:
        timeout = self.request.get("timeout")
        self._waiting = None if timeout is None else self.bounds.call("pty", timeout)

    def _expired(self) -> SandboxTimeout:
        self.done = True
        return SandboxTimeout(str(super()._expired()), None)

    def _frame(self, frame: Frame | None) -> OutputChunk | None:
        if frame is not None and frame[0] is Kind.STDOUT:
            return OutputChunk("stdout", frame[1])
        self.result = results.parse_exec_result(check_result(frame, "pty"), b"", b"")
        self._finish(self.result)
        return None


class WatchOp(Operation[str]):
    """``watch``: a ``ready`` DATA frame, then one DATA frame per event until the host hangs
    up, or a RESULT when the watched directory goes (``value`` is then its reason)."""

    def __init__(self, path: str, recursive: bool, bounds: CallBounds) -> None:
        super().__init__({"op": "watch", "path": path, "recursive": recursive}, bounds)
        self.ready = False
        self.event: FileEvent | None = None  # what the last frame was

    def start(self) -> None:
        self._waiting = self.bounds.call("watch", None)  # for "ready"; then none

    def _frame(self, frame: Frame | None) -> None:
        self.event = None
        if frame is not None and frame[0] is Kind.DATA:
            obj = decode(frame[1])
            if not self.ready:
                if obj.get("type") != "ready":
                    raise ProtocolError(f"a watch began with {obj!r:.80} instead of ready")
                self.ready, self._waiting = True, None
                return
            self.event = results.parse_file_event(obj)
        elif frame is not None and frame[0] is Kind.ERROR:
            raise remote_error(frame[1])
        elif frame is not None and frame[0] is Kind.RESULT and self.ready:
            reason = decode(frame[1]).get("reason")
            self._finish(str(reason) if isinstance(reason, str) else "ended")
        else:
            raise unexpected(frame, "watch")

"""``file_get``: a small file whole in one short exchange on a kept connection.

Why: ``file_read`` is a stream the agent ends with DATA_EOF and a RESULT, on a connection of
its own, so even a 12-byte file cost a new vsock connection and three packets through the
guest's emulated kernel (~110-150 ms here, a ping ~20 ms). ``file_get`` asks for the file
only if it is at most ``max`` bytes: the agent answers with one DATA frame and its RESULT in
one write, or with ``{"whole": false}`` alone, and the caller then reads it as before (the
file ring, or ``file_read``). An agent from before this op answers "unknown op": the op
says so (:attr:`GetFile.unsupported`) and the caller stops asking that agent.
"""

from __future__ import annotations

from ember.client.bounds import CallBounds
from ember.client.core import Operation
from ember.client.wire import Frame, check_result, remote_error
from ember.client.wire import unexpected as unexpected_frame
from ember.errors import ProtocolError
from ember.protocol import FILE_GET_MAX, Kind

__all__ = ["GetFile", "get_limit"]


def get_limit(limit: int | None) -> int:
    """What to ask for at most: a caller's ``max_output`` below :data:`FILE_GET_MAX` is the
    limit itself, so a file over it is left to the path that says so in its error."""
    return FILE_GET_MAX if limit is None else max(0, min(FILE_GET_MAX, limit))


class GetFile(Operation[bytes | None]):
    """file_get: the file's bytes, or None when it is larger than ``limit`` (or the agent
    does not know the op: :attr:`unsupported`)."""

    def __init__(self, path: str, bounds: CallBounds, limit: int) -> None:
        super().__init__({"op": "file_get", "path": path, "max": limit}, bounds)
        self.keepalive = True
        self.unsupported = False
        self._limit = limit
        self._data: bytes | None = None
        self._waiting = bounds.call("file_get", None)

    def _frame(self, frame: Frame | None) -> None:
        if frame is not None and frame[0] is Kind.DATA and self._data is None:
            if len(frame[1]) > self._limit:
                raise ProtocolError(f"file_get sent {len(frame[1])} bytes, over {self._limit}")
            self._data = frame[1]
            return
        if frame is not None and frame[0] is Kind.ERROR:
            error = remote_error(frame[1])
            if error.type == "BadRequest" and error.message.startswith("unknown op"):
                self.unsupported = True  # an older agent, which closes the connection
                self._finish(None)
                return
            self.reusable = True  # an error reply ends the exchange cleanly
            raise error
        if frame is not None and frame[0] is not Kind.RESULT:
            raise unexpected_frame(frame, "file_get")
        obj = check_result(frame, "file_get")
        whole = obj.get("whole")
        if whole is True and self._data is not None and obj.get("size") == len(self._data):
            value: bytes | None = self._data
        elif whole is False and self._data is None:
            value = None
        else:
            raise ProtocolError(f"file_get: a RESULT {obj!r:.200} that does not fit its data")
        self.reusable = True
        self._finish(value)

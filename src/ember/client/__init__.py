"""The host's client of the guest agent: a sans-IO core and the transports that drive it.

::

    results.py    typed results (ExecResult, CodeResult, ...) and the checks of each answer
    wire.py       frames as the host reads them: headers, JSON, ERROR frames (no I/O)
    bounds.py     deadlines, max_output, the resume announcement (no clock of its own)
    core.py       each operation as a state machine: fed frames, returns events (no I/O)
    session.py    builds operations and REQUESTs; the keepalive pool (its clock given)
    sockets.py    frames over a blocking socket, each bounded by a deadline
    blocking.py   sockets + threads: AgentClient
    files_blocking.py   the blocking client's files (Files)
    exec_blocking.py    an exec's output as it arrives (ExecStream)
    aio.py        asyncio streams: AsyncAgentClient, AsyncFiles
    exec_aio.py   asyncio streams: AsyncExecStream (an exec's output as it arrives)
    channel.py    data channels from guest code (ChannelServer)
    code_ring.py  run_code over the shared region's rings (CodeRing)
    shm.py        memory channels: the shared region, its slots and rings
    output_ring.py      an exec's output through a leased slot (blocking client)
    output_ring_aio.py  the same for the asyncio client
    attach.py     the blocking client for a VMM this process drives (region, rings, client)

Names are imported on first use (PEP 562), so ``ember.client.results`` alone costs no
sockets, threads or asyncio.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.client.aio import AsyncAgentClient, AsyncExecStream, AsyncFiles, Streams
    from ember.client.blocking import AgentClient, Files
    from ember.client.bounds import (
        DEFAULT_CALL_TIMEOUT,
        DEFAULT_GRACE,
        DEFAULT_MAX_OUTPUT,
        WORKER_START_ALLOWANCE,
        Deadline,
    )
    from ember.client.channel import ChannelServer
    from ember.client.code_ring import CodeRing
    from ember.client.core import Command, PathArg
    from ember.client.exec_blocking import ExecStream
    from ember.client.file_ring import FileRing
    from ember.client.results import (
        CodeError,
        CodeResult,
        DirEntry,
        ExecResult,
        FileStat,
        OutputChunk,
        explain_crashed_worker,
    )
    from ember.client.shm import HostRegion, LazyRegion
    from ember.client.sockets import read_frame, send_frame
    from ember.client.wire import MAX_JSON_DEPTH, Source

    Client = AgentClient
    AsyncClient = AsyncAgentClient

_LAZY: dict[str, tuple[str, str]] = {
    "AgentClient": ("ember.client.blocking", "AgentClient"),
    "AsyncAgentClient": ("ember.client.aio", "AsyncAgentClient"),
    "AsyncClient": ("ember.client.aio", "AsyncAgentClient"),
    "AsyncExecStream": ("ember.client.exec_aio", "AsyncExecStream"),
    "AsyncFiles": ("ember.client.aio", "AsyncFiles"),
    "ChannelServer": ("ember.client.channel", "ChannelServer"),
    "Client": ("ember.client.blocking", "AgentClient"),
    "CodeError": ("ember.client.results", "CodeError"),
    "CodeRing": ("ember.client.code_ring", "CodeRing"),
    "CodeResult": ("ember.client.results", "CodeResult"),
    "Command": ("ember.client.core", "Command"),
    "DEFAULT_CALL_TIMEOUT": ("ember.client.bounds", "DEFAULT_CALL_TIMEOUT"),
    "DEFAULT_GRACE": ("ember.client.bounds", "DEFAULT_GRACE"),
    "DEFAULT_MAX_OUTPUT": ("ember.client.bounds", "DEFAULT_MAX_OUTPUT"),
    "Deadline": ("ember.client.bounds", "Deadline"),
    "DirEntry": ("ember.client.results", "DirEntry"),
    "ExecResult": ("ember.client.results", "ExecResult"),
    "ExecStream": ("ember.client.exec_blocking", "ExecStream"),
    "FileStat": ("ember.client.results", "FileStat"),
    "FileRing": ("ember.client.file_ring", "FileRing"),
    "Files": ("ember.client.files_blocking", "Files"),
    "HostRegion": ("ember.client.shm", "HostRegion"),
    "MAX_JSON_DEPTH": ("ember.client.wire", "MAX_JSON_DEPTH"),
    "OutputChunk": ("ember.client.results", "OutputChunk"),
    "PathArg": ("ember.client.core", "PathArg"),
    "LazyRegion": ("ember.client.shm", "LazyRegion"),
    "Source": ("ember.client.wire", "Source"),
    "Streams": ("ember.client.aio", "Streams"),
    "WORKER_START_ALLOWANCE": ("ember.client.bounds", "WORKER_START_ALLOWANCE"),
    "explain_crashed_worker": ("ember.client.results", "explain_crashed_worker"),
    "read_frame": ("ember.client.sockets", "read_frame"),
    "send_frame": ("ember.client.sockets", "send_frame"),
}

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_OUTPUT",
    "MAX_JSON_DEPTH",
    "WORKER_START_ALLOWANCE",
    "AgentClient",
    "AsyncAgentClient",
    "AsyncClient",
    "AsyncExecStream",
    "AsyncFiles",
    "ChannelServer",
    "Client",
    "CodeError",
    "CodeResult",
    "CodeRing",
    "Command",
    "Deadline",
    "DirEntry",
    "ExecResult",
    "ExecStream",
    "FileRing",
    "FileStat",
    "Files",
    "HostRegion",
    "LazyRegion",
    "OutputChunk",
    "PathArg",
    "Source",
    "Streams",
    "explain_crashed_worker",
    "read_frame",
    "send_frame",
]


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'ember.client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where[0]), where[1])
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

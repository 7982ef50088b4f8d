"""``sb.files`` of each facade: the guest's file system, the same six calls four ways.

In-process (:class:`SandboxFiles`, :class:`AsyncSandboxFiles`) each call goes to the
agent client's ``files`` through the sandbox's crash guard, streamed in bounded pieces;
through a daemon (:class:`RemoteFiles`, :class:`AsyncRemoteFiles`) each is one HTTP
request built (and its reply read) by the functions at the end of this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO

from ember.client import DEFAULT_MAX_OUTPUT, DirEntry, FileStat, PathArg
from ember.client.watch import AsyncWatch, Watch
from ember.sandbox.daemon import Request

if TYPE_CHECKING:
    from ember.sandbox.aio import AsyncSandbox
    from ember.sandbox.remote import RemoteSandbox
    from ember.sandbox.remote_async import AsyncRemoteSandbox
    from ember.sandbox.remote_watch import AsyncRemoteWatch, RemoteWatch
    from ember.sandbox.sync import Sandbox


class SandboxFiles:
    """``sb.files``: the guest's file system, streamed in bounded pieces."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox
        self._files = sandbox._client.files

    def write(self, path: PathArg, data: bytes | BinaryIO, *, mode: int | None = None) -> int:
        return self._sb._call(self._files.write, path, data, mode=mode)

    def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        """The whole file; beyond ``max_output`` bytes OutputTooLarge (then use read_into)."""
        return self._sb._call(self._files.read, path, max_output=max_output)

    def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        return self._sb._call(self._files.read_into, path, fileobj)

    def stat(self, path: PathArg) -> FileStat:
        return self._sb._call(self._files.stat, path)

    def list(self, path: PathArg) -> list[DirEntry]:
        return self._sb._call(self._files.list, path)

    def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        self._sb._call(self._files.remove, path, recursive=recursive)

    def watch(self, path: PathArg, *, recursive: bool = False) -> Watch:
        """Changes under the directory ``path``, as they happen; see ``Files.watch``."""
        return self._sb._call(self._files.watch, path, recursive=recursive)


class AsyncSandboxFiles:
    """``sb.files`` of an AsyncSandbox: ``SandboxFiles``' methods, awaitable."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox
        self._files = sandbox._client.files

    async def write(self, path: PathArg, data: bytes | BinaryIO, *, mode: int | None = None) -> int:
        return await self._sb._call(self._files.write, path, data, mode=mode)

    async def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        return await self._sb._call(self._files.read, path, max_output=max_output)

    async def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        return await self._sb._call(self._files.read_into, path, fileobj)

    async def stat(self, path: PathArg) -> FileStat:
        return await self._sb._call(self._files.stat, path)

    async def list(self, path: PathArg) -> list[DirEntry]:
        return await self._sb._call(self._files.list, path)

    async def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        await self._sb._call(self._files.remove, path, recursive=recursive)

    async def watch(self, path: PathArg, *, recursive: bool = False) -> AsyncWatch:
        """Changes under the directory ``path``; see ``SandboxFiles.watch``."""
        return await self._sb._call(self._files.watch, path, recursive=recursive)


class RemoteFiles:
    """``sb.files`` of a daemon's sandbox (whole files per request, bounded by the daemon)."""

    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sb = sandbox

    def write(self, path: PathArg, data: bytes | BinaryIO, *, mode: int | None = None) -> int:
        return self._sb._do(write_file(path, data, mode))

    def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        return self._sb._do(read_file(path, max_output))

    def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        return fileobj.write(self.read(path))

    def stat(self, path: PathArg) -> FileStat:
        return self._sb._do(stat_file(path))

    def list(self, path: PathArg) -> list[DirEntry]:
        return self._sb._do(list_dir(path))

    def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        self._sb._do(remove_file(path, recursive))

    def watch(self, path: PathArg, *, recursive: bool = False) -> RemoteWatch:
        """Changes under the directory ``path``, streamed by the daemon; see ``Files.watch``."""
        return self._sb._watch(path, recursive)


class AsyncRemoteFiles:
    """``sb.files`` of a daemon's sandbox for asyncio code (see ``RemoteFiles``)."""

    def __init__(self, sandbox: AsyncRemoteSandbox) -> None:
        self._sb = sandbox

    async def write(self, path: PathArg, data: bytes | BinaryIO, *, mode: int | None = None) -> int:
        return await self._sb._do(write_file(path, data, mode))

    async def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        return await self._sb._do(read_file(path, max_output))

    async def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        return fileobj.write(await self.read(path))

    async def stat(self, path: PathArg) -> FileStat:
        return await self._sb._do(stat_file(path))

    async def list(self, path: PathArg) -> list[DirEntry]:
        return await self._sb._do(list_dir(path))

    async def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        await self._sb._do(remove_file(path, recursive))

    async def watch(self, path: PathArg, *, recursive: bool = False) -> AsyncRemoteWatch:
        """Changes under the directory ``path``; see ``RemoteFiles.watch``."""
        return await self._sb._watch(path, recursive)


# --- the daemon's requests (whole files per request, bounded by the daemon)
def write_file(path: PathArg, data: bytes | BinaryIO, mode: int | None) -> Request[int]:
    params: dict[str, Any] = {"path": str(path)}
    if mode is not None:
        params["mode"] = mode
    content = data if isinstance(data, bytes) else data.read()
    return Request("PUT", "/files", lambda r: int(r["size"]), {"params": params,
                                                              "content": content})  # fmt: skip


def read_file(path: PathArg, max_output: int | None) -> Request[bytes]:
    params: dict[str, Any] = {"path": str(path)}
    if max_output is not None:
        params["max_output"] = max_output
    return Request("GET", "/files", bytes, {"params": params})


def stat_file(path: PathArg) -> Request[FileStat]:
    def parse(d: dict[str, Any]) -> FileStat:
        return FileStat(d["size"], d["mode"], d["mtime"], d["is_dir"], d["is_file"])

    return Request("GET", "/files/stat", parse, {"params": {"path": str(path)}})


def list_dir(path: PathArg) -> Request[list[DirEntry]]:
    def parse(d: dict[str, Any]) -> list[DirEntry]:
        return [DirEntry(e["name"], e["size"], e["is_dir"]) for e in d["entries"]]

    return Request("GET", "/files/list", parse, {"params": {"path": str(path)}})


def remove_file(path: PathArg, recursive: bool) -> Request[Any]:
    return Request("DELETE", "/files", options={"params": {"path": str(path),
                                                           "recursive": recursive}})  # fmt: skip

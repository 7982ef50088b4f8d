"""``ember.ray.AsyncSandbox``: :class:`ember.ray.Sandbox` for asyncio code.

:class:`~ember.sandbox.remote_async.AsyncRemoteSandbox` (``httpx.AsyncClient``) with the
same three differences as the blocking class (see :mod:`ember.ray.sandbox`): placed on a
node by ``start()`` (``async with``), keepalive on its connections, and a lost node
raised as :class:`~ember.errors.SandboxLost`.  Ray calls are awaited (an ``ObjectRef``
is awaitable); polling the nodes' capacity runs on a thread, so the event loop never
blocks on the cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx
import ray

from ember.client import OutputChunk
from ember.errors import ConfigError, SandboxError, SandboxLost
from ember.ray import node as nodes_
from ember.ray.placement import NodeInfo
from ember.ray.registry import Placed, registry
from ember.ray.sandbox import (
    RayOptions,
    _candidates,
    _ensure_template,
    _keepalive,
    _lost,
    _pushes,
    _release,
)
from ember.sandbox import daemon
from ember.sandbox.files import AsyncRemoteFiles
from ember.sandbox.options import StreamArgs
from ember.sandbox.remote_async import AsyncApi, AsyncRemoteSandbox
from ember.sandbox.signature import takes
from ember.sandbox.wire import ServerError

T = TypeVar("T")


class AsyncNodeApi(AsyncApi):
    """One node's daemon for asyncio code (see :class:`ember.ray.sandbox.NodeApi`)."""

    def __init__(self, node: NodeInfo) -> None:
        transport = httpx.AsyncHTTPTransport(socket_options=_keepalive())

        def make(**kwargs: Any) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=transport, **kwargs)

        self.url, self.http = daemon.http_client(make, node.url, node.token)
        self.node = node

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return await super().call(method, path, **kwargs)
        except SandboxError as exc:
            if isinstance(exc.__cause__, httpx.TransportError):
                raise _lost(self.node, exc) from exc
            raise


async def _agent_dead(node: NodeInfo) -> bool:
    try:
        await asyncio.wait_for(nodes_.agent(node).ping.remote(), 5.0)
    except Exception:
        return True
    return False


class AsyncSandbox(AsyncRemoteSandbox):
    """A cluster sandbox for asyncio code, placed and made by ``start()``."""

    _api: AsyncNodeApi

    @takes(RayOptions)
    def __init__(self, options: RayOptions) -> None:
        if options.server is not None:
            raise ConfigError("ember.ray.AsyncSandbox picks its node: do not pass server=")
        self._options = options
        self._body = options.daemon_body()
        self._info: dict[str, Any] = {}
        self._closed = False
        self.files = AsyncRemoteFiles(self)  # type: ignore[assignment]

    async def start(self) -> AsyncSandbox:
        if self._info:
            return self
        mem, errors, template = self._options.mem_mib, [], self._options.template
        for cap in await asyncio.to_thread(_candidates, mem, self._options.placement, template):
            name = cap.node.node_id[:12]
            try:
                handle = nodes_.agent(cap.node)
                ticket = await asyncio.wait_for(handle.reserve.remote(mem), 30.0)
            except (ray.exceptions.RayError, ValueError, TimeoutError) as exc:
                errors.append(f"{name}: {type(exc).__name__}")
                continue
            if ticket is None:
                errors.append(f"{name}: full")
                continue
            api = AsyncNodeApi(cap.node)
            try:
                if template is not None and template not in cap.templates:
                    await asyncio.to_thread(_ensure_template, handle, template)
                info = await api.call("POST", "/sandboxes", json=self._body)
            except SandboxLost as exc:
                await api.http.aclose()
                errors.append(f"{name}: {exc}")
                continue
            except BaseException:
                await api.http.aclose()
                raise
            finally:
                await asyncio.to_thread(_release, handle, ticket)
            self._api, self._info = api, info
            placed = Placed(info["id"], cap.node.node_id, dict(info.get("metadata") or {}),
                            float(info.get("created_at") or time.time()))  # fmt: skip
            try:
                await registry().record.remote(placed)
            except BaseException:
                await self.close()
                raise
            return self
        why = "; ".join(errors) or "no node agents (does any node have an ember_kvm resource?)"
        raise SandboxError(f"no node has room for a {mem} MiB sandbox: {why}")

    @property
    def node(self) -> NodeInfo:
        return self._api.node

    async def _do(self, request: daemon.Request[T]) -> T:
        try:
            return await super()._do(request)
        except ServerError as exc:
            if exc.code == "not_found" and await _agent_dead(self._api.node):
                raise self._lost(exc) from exc
            raise
        except SandboxLost:
            registry().forget.remote(self.id)
            raise

    def _lost(self, why: BaseException) -> SandboxLost:
        registry().forget.remote(self.id)
        return _lost(self._api.node, why)

    @takes(StreamArgs)
    async def exec_stream(self, a: StreamArgs) -> AsyncIterator[OutputChunk]:
        args = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
        try:
            async for chunk in super().exec_stream(**args):
                yield chunk
        except httpx.TransportError as exc:
            raise self._lost(exc) from exc

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await super().close()
        except SandboxLost:
            pass
        finally:  # awaited: see ember.ray.Sandbox.close
            if self._info:
                _pushes(self._api.node)
                await registry().forget.remote(self.id)


async def connect_async(sandbox_id: str) -> AsyncSandbox:
    """:func:`ember.ray.connect` for asyncio code."""
    hit = await registry().lookup.remote(sandbox_id)
    candidates = [hit[1]] if hit is not None else await registry().nodes.remote()
    for node in candidates:
        api = AsyncNodeApi(node)
        try:
            info = await api.call("GET", f"/sandboxes/{sandbox_id}")
        except ServerError as exc:
            await api.http.aclose()
            if exc.code == "not_found":
                continue
            raise
        except BaseException:
            await api.http.aclose()
            raise
        sb = object.__new__(AsyncSandbox)
        sb._api, sb._info, sb._closed = api, info, False
        sb.files = AsyncRemoteFiles(sb)  # type: ignore[assignment]
        return sb
    raise SandboxError(f"no sandbox {sandbox_id!r} in this cluster")

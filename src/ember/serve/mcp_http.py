"""MCP under the daemon: the same tools as ``ember mcp``, over streamable HTTP at ``/mcp/``.

An AI agent that can reach the daemon needs no process of its own on the host: it points
its MCP client at ``http://HOST:PORT/mcp/`` with the daemon's bearer token (the daemon's
:class:`~ember.serve.guard.Guard` checks it for this path as for every other). The tools
act on the daemon's own sandboxes through its :class:`Manager`, so their ids are the
ids of ``ember ps``, the REST API and ``Sandbox.connect``, and they outlive the MCP
session. Sync tools run on worker threads (the ``mcp`` package does that), never on the
event loop that serves the rest of the API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from ember.serve.manager import CreateArgs, Manager
from ember.serve.mcp_server import Sandboxes, build

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ember.sandbox import Sandbox

__all__ = ["ManagedSandboxes", "McpMount"]


class ManagedSandboxes(Sandboxes):
    """The tools' sandboxes, as the daemon's manager holds them (nothing of its own)."""

    def __init__(self, manager: Manager) -> None:
        super().__init__("")
        self._manager = manager

    def create(self, template: str | None, metadata: dict[str, str] | None) -> str:
        entry = self._manager.create(CreateArgs(template=template, metadata=dict(metadata or {})))
        return entry.record.id

    def get(self, sandbox_id: str) -> Sandbox:
        from ember.serve.manager import NotFound

        try:
            return self._manager.running(sandbox_id)[1]
        except NotFound:
            raise LookupError(
                f"no sandbox {sandbox_id!r}: create one with create_sandbox"
            ) from None

    def kill(self, sandbox_id: str) -> None:
        self.get(sandbox_id)  # a clear error for an unknown id
        self._manager.delete(sandbox_id)

    def close(self) -> None:
        """The daemon's sandboxes are the daemon's: an MCP session ending leaves them be."""


class McpMount:
    """The MCP app to mount at ``/mcp`` and the lifespan its session manager needs."""

    def __init__(self, manager: Manager) -> None:
        self.server: MCPServer = build(ManagedSandboxes(manager))
        # The bearer token guards this path; Host checks would only refuse a daemon that
        # listens on a node's address (Ray), not an attacker, who lacks the token.
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        self.app: Starlette = self.server.streamable_http_app(
            streamable_http_path="/", transport_security=security
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.server.session_manager.run():
            yield

"""``ember mcp``: Ember's sandboxes as tools for AI agents (Model Context Protocol, stdio).

Built on the official ``mcp`` package (``MCPServer``).  Tools: create a
sandbox, run Python code in its persistent interpreter, execute a command,
read, write and list files, and kill it.  With a daemon (``--server`` or
``$EMBER_SERVER``) the sandboxes are the daemon's (their ids work with
``ember ps``, the REST API and the SDK, and outlive this process); without,
they live in this process and die with it.
"""

from __future__ import annotations

import threading
from typing import Any

from mcp.server.mcpserver import MCPServer

from ember.sandbox import Sandbox
from ember.serve.state import new_id

OUTPUT_LIMIT = 1 << 20  # per tool reply: an agent's context is the scarce thing
INSTRUCTIONS = (
    "Ember runs untrusted code in microVM sandboxes. create_sandbox gives an id; run_code keeps "
    "Python state between calls; exec_command runs a program; files live in the sandbox."
)


def _text(data: bytes) -> str:
    text = data[:OUTPUT_LIMIT].decode("utf-8", "replace")
    return text + ("\n[output truncated]" if len(data) > OUTPUT_LIMIT else "")


class Sandboxes:
    """The sandboxes this server made or attached, by id."""

    def __init__(self, server: str) -> None:
        self.server = server  # "" : in-process
        self._by_id: dict[str, Sandbox] = {}
        self._lock = threading.Lock()

    def create(self, template: str | None, metadata: dict[str, str] | None) -> str:
        if self.server:
            sb = Sandbox(server=self.server, template=template, metadata=metadata)
            sandbox_id = str(sb.id)
        else:
            sb, sandbox_id = Sandbox(server="", template=template), new_id()
        with self._lock:
            self._by_id[sandbox_id] = sb
        return sandbox_id

    def get(self, sandbox_id: str) -> Sandbox:
        with self._lock:
            sb = self._by_id.get(sandbox_id)
        if sb is None and self.server:
            sb = Sandbox.connect(sandbox_id, server=self.server)  # one the daemon has
            with self._lock:
                self._by_id[sandbox_id] = sb
        if sb is None:
            raise LookupError(f"no sandbox {sandbox_id!r}: create one with create_sandbox")
        return sb

    def kill(self, sandbox_id: str) -> None:
        sb = self.get(sandbox_id)
        with self._lock:
            self._by_id.pop(sandbox_id, None)
        sb.kill()

    def close(self) -> None:
        """In-process sandboxes end with the server; a daemon's are only let go of."""
        with self._lock:
            found, self._by_id = list(self._by_id.values()), {}
        for sb in found:
            detach = getattr(sb, "detach", None)
            if detach is not None:
                detach()
            else:
                sb.close()


def build(sandboxes: Sandboxes) -> MCPServer:
    mcp: MCPServer = MCPServer("ember", instructions=INSTRUCTIONS)

    @mcp.tool()
    def create_sandbox(
        template: str | None = None, metadata: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Create a sandbox (a microVM restored from a template, ready in well under a second);
        returns its id for the other tools."""
        return {"sandbox_id": sandboxes.create(template, metadata)}

    @mcp.tool()
    def run_code(sandbox_id: str, code: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run Python code in the sandbox's persistent interpreter (variables and imports stay
        between calls); returns stdout, stderr, the last expression's value, and any error."""
        r = sandboxes.get(sandbox_id).run_code(code, timeout=timeout)
        error = (
            None if r.error is None else f"{r.error.type}: {r.error.message}\n{r.error.traceback}"
        )
        return {"stdout": r.stdout[:OUTPUT_LIMIT], "stderr": r.stderr[:OUTPUT_LIMIT],
                "value": r.value, "error": error}  # fmt: skip

    @mcp.tool()
    def exec_command(
        sandbox_id: str, command: list[str] | str, timeout: float = 120.0, cwd: str | None = None
    ) -> dict[str, Any]:
        """Run a command (an argv list, or a shell command line) and wait for it; returns its
        exit code, stdout and stderr."""
        r = sandboxes.get(sandbox_id).exec(command, timeout=timeout, cwd=cwd)
        return {"exit_code": r.exit_code, "signal": r.signal, "timed_out": r.timed_out,
                "stdout": _text(r.stdout), "stderr": _text(r.stderr)}  # fmt: skip

    @mcp.tool()
    def read_file(sandbox_id: str, path: str) -> str:
        """The text of a file in the sandbox (UTF-8; undecodable bytes replaced)."""
        return _text(sandboxes.get(sandbox_id).files.read(path, max_output=OUTPUT_LIMIT + 1))

    @mcp.tool()
    def write_file(sandbox_id: str, path: str, content: str) -> dict[str, int]:
        """Write text to a file in the sandbox (parent directories are made); returns its size."""
        return {"size": sandboxes.get(sandbox_id).files.write(path, content.encode())}

    @mcp.tool()
    def list_files(sandbox_id: str, path: str = "/") -> list[dict[str, Any]]:
        """The entries of a directory in the sandbox: name, size, is_dir."""
        entries = sandboxes.get(sandbox_id).files.list(path)
        return [{"name": e.name, "size": e.size, "is_dir": e.is_dir} for e in entries]

    @mcp.tool()
    def kill_sandbox(sandbox_id: str) -> dict[str, bool]:
        """Destroy a sandbox and everything in it."""
        sandboxes.kill(sandbox_id)
        return {"killed": True}

    return mcp


def run_stdio(server: str) -> None:
    sandboxes = Sandboxes(server)
    try:
        build(sandboxes).run("stdio")
    finally:
        sandboxes.close()

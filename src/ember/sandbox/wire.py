"""The JSON shapes the daemon and its clients share, and errors as stable codes.

Bytes travel base64-encoded (``stdout``, ``stderr``, a stream line's
``data``); everything else is plain JSON.  An error is always::

    {"error": {"code": "not_found", "message": "...", ...}}

with a ``code`` from :data:`STATUS` that clients switch on (never on the
message).  Importable without FastAPI: the HTTP client uses it too, and it
lives below both (``ember.serve`` imports the SDK, never the other way).  So
does where a local daemon keeps its state: a client on the same host finds
the token there.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from ember.client import CodeError, CodeResult, DirEntry, ExecResult, FileStat
from ember.errors import (
    ConfigError,
    EmberError,
    OutputTooLarge,
    SandboxCrashed,
    SandboxError,
    SandboxTimeout,
    agent_error,
)

TOKEN_NAME = "token"  # the daemon's bearer token, in its state directory


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/ember/serve`` (``~/.local/state/ember/serve``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ember" / "serve"


# code -> HTTP status
STATUS: dict[str, int] = {
    "bad_request": 400,
    "config_error": 400,
    "agent_error": 400,
    "unauthorized": 401,
    "not_found": 404,
    "sandbox_crashed": 409,
    "sandbox_paused": 409,
    "payload_too_large": 413,
    "output_too_large": 413,
    "invalid_request": 422,
    "internal": 500,
    "sandbox_error": 503,
    "timeout": 504,
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def exec_result_json(r: ExecResult) -> dict[str, Any]:
    return {
        "exit_code": r.exit_code,
        "signal": r.signal,
        "stdout": b64(r.stdout),
        "stderr": b64(r.stderr),
        "timed_out": r.timed_out,
        "duration": r.duration,
    }


def exec_result(d: dict[str, Any]) -> ExecResult:
    return ExecResult(
        exit_code=d["exit_code"],
        signal=d["signal"],
        stdout=unb64(d.get("stdout", "")),
        stderr=unb64(d.get("stderr", "")),
        timed_out=bool(d["timed_out"]),
        duration=float(d["duration"]),
    )


def code_result_json(r: CodeResult) -> dict[str, Any]:
    error = None
    if r.error is not None:
        error = {"type": r.error.type, "message": r.error.message, "traceback": r.error.traceback}
    return {"stdout": r.stdout, "stderr": r.stderr, "value": r.value, "error": error}


def code_result(d: dict[str, Any]) -> CodeResult:
    e = d.get("error")
    error = CodeError(e["type"], e["message"], e["traceback"]) if e else None
    return CodeResult(stdout=d["stdout"], stderr=d["stderr"], value=d["value"], error=error)


def stat_json(s: FileStat) -> dict[str, Any]:
    return {"size": s.size, "mode": s.mode, "mtime": s.mtime, "is_dir": s.is_dir,
            "is_file": s.is_file}  # fmt: skip


def entry_json(e: DirEntry) -> dict[str, Any]:
    return {"name": e.name, "size": e.size, "is_dir": e.is_dir}


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and JSON body for an exception raised while serving a request."""
    from ember.errors import AgentError

    extra: dict[str, Any] = {}
    if isinstance(exc, SandboxCrashed):
        code = "sandbox_crashed"
        extra["console"] = exc.console_tail
    elif isinstance(exc, AgentError):
        code = "agent_error"
        extra["type"] = exc.type
        message = exc.message
    elif isinstance(exc, SandboxTimeout):
        code = "timeout"
        if exc.result is not None:
            extra["result"] = exec_result_json(exc.result)
    elif isinstance(exc, OutputTooLarge):
        code = "output_too_large"
        extra["limit"] = exc.limit
    elif isinstance(exc, ConfigError | ValueError):
        code = "config_error"
    elif type(exc).__name__ == "Paused":  # ember.serve.manager.Paused (no import cycle)
        code = "sandbox_paused"
    elif type(exc).__name__ == "NotFound" and exc.args:  # ember.serve.manager.NotFound
        code = "not_found"
        kind = exc.args[1] if len(exc.args) > 1 else "sandbox"
        message = f"no {kind} {exc.args[0]!r}"
    elif isinstance(exc, EmberError):
        code = "sandbox_error"
    else:
        code = "internal"
    if not isinstance(exc, AgentError) and code != "not_found":
        message = str(exc) if code != "internal" else f"internal error: {type(exc).__name__}"
    return STATUS[code], {"error": {"code": code, "message": message, **extra}}


class ServerError(SandboxError):
    """The daemon refused a request; ``code`` is its stable error code, ``status`` HTTP's."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.status = status


def raise_for(status: int, body: Any) -> None:
    """Turn a daemon's error reply back into the exception the in-process SDK would raise."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        raise ServerError("internal", f"HTTP {status}: {str(body)[:200]}", status)
    code, message = str(err.get("code")), str(err.get("message"))
    if code == "sandbox_crashed":
        raise SandboxCrashed(message, str(err.get("console", "")))
    if code == "agent_error":
        raise agent_error(str(err.get("type", "AgentError")), message)
    if code == "timeout":
        result = err.get("result")
        raise SandboxTimeout(message, exec_result(result) if result else None)
    if code == "output_too_large":
        raise OutputTooLarge(message, int(err.get("limit", 0)))
    if code == "config_error":
        raise ConfigError(message)
    raise ServerError(code, message, status)

"""Pieces every agent op shares: request-field checks, agent-side errors, logging.

A request comes from the host, which we trust more than guest code, but a bad
field must still become a clear ``ERROR`` frame (``BadRequest``), never an
exception that reaches the accept loop.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ember.protocol import KEPT_STREAM_OPS

__all__ = [
    "BadRequest",
    "ClientGone",
    "ExecError",
    "kept_stream",
    "log",
    "opt_bool",
    "opt_float",
    "opt_int",
    "opt_str",
    "req_path",
    "req_str",
]


class BadRequest(Exception):
    """A request is missing a field or has one of the wrong type."""


class ExecError(Exception):
    """A command could not be started (no such program, bad cwd, ...)."""


class ClientGone(Exception):
    """The host hung up mid-request: stop quietly, there is nobody to answer."""


def log(message: str) -> None:
    """One line to stderr, which is the guest console: keep it for real trouble."""
    try:
        sys.stderr.write(f"ember-agent[{os.getpid()}]: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


def req_str(req: dict[str, Any], key: str) -> str:
    value = req.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"{key!r} must be a string")
    return value


def opt_str(req: dict[str, Any], key: str) -> str | None:
    value = req.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{key!r} must be a string or null")
    return value


def opt_bool(req: dict[str, Any], key: str) -> bool:
    value = req.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{key!r} must be true or false")
    return value


def opt_int(req: dict[str, Any], key: str) -> int | None:
    value = req.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"{key!r} must be an integer or null")
    return value


def opt_float(req: dict[str, Any], key: str) -> float | None:
    """A positive number of seconds, or None for 'no limit'."""
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise BadRequest(f"{key!r} must be a positive number of seconds or null")
    return float(value)


def req_path(req: dict[str, Any], key: str = "path") -> str:
    """An absolute path: the agent's own cwd is not something the host should rely on."""
    path = req_str(req, key)
    if not path.startswith("/") or "\0" in path:
        raise BadRequest(f"{key!r} must be an absolute path, e.g. /root/data.csv; got {path!r}")
    return path


def kept_stream(req: dict[str, Any]) -> bool:
    """Whether this stream's connection carries the host's next request after its RESULT.

    Only when the host asked, and only for streams after whose RESULT the connection holds
    nothing more: not an exec with stdin (STDIN frames may still be on their way).
    """
    return (
        req.get("keepalive") is True
        and req.get("op") in KEPT_STREAM_OPS
        and req.get("stdin", False) is False
    )

"""Exceptions the host-side agent client raises, all within Ember's one tree.

::

    EmberError
    ├── AgentError             the agent answered ERROR {"type", "message"}
    │   ├── ExecError          a command could not be started (no such program, bad cwd)
    │   ├── AgentFileNotFoundError    also a FileNotFoundError
    │   ├── AgentFileExistsError      also a FileExistsError
    │   ├── AgentPermissionError      also a PermissionError
    │   ├── AgentIsADirectoryError    also an IsADirectoryError
    │   └── AgentNotADirectoryError   also a NotADirectoryError
    ├── SandboxTimeout         an exec overran its timeout (partial result attached),
    │                          the agent did not answer within the host's deadline,
    │                          or a channel did not open in time; also a TimeoutError
    ├── OutputTooLarge         exec()/files.read() got more than max_output bytes
    └── ProtocolError          the guest broke the wire protocol or hung up mid-answer

File errors double as the builtin ``OSError`` subclasses, so ordinary code
(``except FileNotFoundError``) works on sandbox paths unchanged.
These live here rather than in :mod:`ember.errors` because they belong to the
client; they still derive from :class:`~ember.errors.EmberError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember import protocol
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.client_wire import ExecResult

__all__ = [
    "AgentError",
    "AgentFileExistsError",
    "AgentFileNotFoundError",
    "AgentIsADirectoryError",
    "AgentNotADirectoryError",
    "AgentPermissionError",
    "ExecError",
    "OutputTooLarge",
    "ProtocolError",
    "SandboxTimeout",
    "agent_error",
]


class AgentError(EmberError):
    """The agent could not do what was asked; ``type`` names the guest-side exception."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


class ExecError(AgentError):
    """The command never started: check the program name, PATH and cwd."""


class AgentFileNotFoundError(AgentError, FileNotFoundError):
    """A path in the sandbox does not exist."""


class AgentFileExistsError(AgentError, FileExistsError):
    """A path in the sandbox already exists."""


class AgentPermissionError(AgentError, PermissionError):
    """The agent lacks permission for a path in the sandbox."""


class AgentIsADirectoryError(AgentError, IsADirectoryError):
    """A file operation hit a directory in the sandbox."""


class AgentNotADirectoryError(AgentError, NotADirectoryError):
    """A path component in the sandbox is not a directory."""


_BY_TYPE: dict[str, type[AgentError]] = {
    "ExecError": ExecError,
    "FileNotFoundError": AgentFileNotFoundError,
    "FileExistsError": AgentFileExistsError,
    "PermissionError": AgentPermissionError,
    "IsADirectoryError": AgentIsADirectoryError,
    "NotADirectoryError": AgentNotADirectoryError,
}


def agent_error(type: str, message: str) -> AgentError:
    """The most specific :class:`AgentError` for a remote exception's class name."""
    return _BY_TYPE.get(type, AgentError)(type, message)


class SandboxTimeout(EmberError, TimeoutError):
    """Something in the sandbox took longer than allowed.

    For ``exec``, ``result`` holds what happened before the process group was
    killed: the output so far, ``timed_out=True`` and the killing signal.
    """

    def __init__(self, message: str, result: ExecResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class OutputTooLarge(EmberError):
    """A call that returns bytes (``exec``, ``files.read``) got more than ``max_output`` of them.

    The guest decides how much it sends, so the host stops holding it at a limit
    instead of growing without bound; the command was stopped (or the read
    abandoned) and nothing is returned. ``limit`` is the ``max_output`` in force.
    """

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class ProtocolError(EmberError, protocol.ProtocolError):
    """The agent sent something the protocol does not allow, or hung up mid-answer.

    The guest is untrusted, so this is what a confused or hostile guest looks
    like from the host: the connection is dropped; the sandbox may need a restart.
    """

"""Ember's one exception tree.

Every error Ember raises on purpose derives from :class:`EmberError`, so a
caller can catch the whole family with one clause and the CLI can turn any of
them into a one-line message instead of a traceback::

    Exception
    └── EmberError                 every error Ember raises on purpose
        ├── ConfigError            bad user input: a missing kernel, too little memory, ...
        │   └── ImageError         a kernel/initrd that is not what it claims to be
        ├── ImageNotBuilt          an artifact `ember image build` has not produced yet
        ├── BuildError             building a guest image failed (a command's tail attached)
        ├── KvmError               /dev/kvm is missing, unusable, or an ioctl failed
        ├── SnapshotError          a snapshot is corrupted, from another format version, or unusable
        ├── GuestCrashed           the guest died: KVM internal error, unexpected shutdown
        ├── SandboxError           a sandbox could not be used
        │   └── SandboxCrashed     its guest panicked or its VMM died (carries the console tail)
        │       └── SandboxLost    the machine (Ray node) holding it is gone (ember.ray)
        ├── AgentError             the guest agent answered ERROR {"type", "message"}
        │   ├── ExecError          a command could not be started (no such program, bad cwd)
        │   ├── AgentFileNotFoundError    also a FileNotFoundError
        │   ├── AgentFileExistsError      also a FileExistsError
        │   ├── AgentPermissionError      also a PermissionError
        │   ├── AgentIsADirectoryError    also an IsADirectoryError
        │   └── AgentNotADirectoryError   also a NotADirectoryError
        ├── SandboxTimeout         an exec overran its timeout (partial result attached), the
        │                          agent did not answer within the host's deadline, or a channel
        │                          did not open in time; also a TimeoutError
        ├── OutputTooLarge         exec()/files.read() got more than max_output bytes
        └── ProtocolError          the guest broke the wire protocol or hung up mid-answer;
                                   also an ember.protocol.ProtocolError (below)

``ember.protocol.ProtocolError`` is the guest agent's own: ``protocol.py`` ships into
the guest, which has no ``ember.errors``. The host never raises it: the client's
framing (:mod:`ember.client.wire`) raises the :class:`ProtocolError` above, which
derives from it, so ``except protocol.ProtocolError`` still catches what the host
raises.

File errors double as the builtin ``OSError`` subclasses, so ordinary code
(``except FileNotFoundError``) works on sandbox paths unchanged. The classes that
``ember`` exports say so in tracebacks (``ember.SandboxTimeout``), wherever they live.

Messages say what to do about the problem, not only what went wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember import protocol

if TYPE_CHECKING:
    from ember.client.results import ExecResult

__all__ = [
    "AgentError",
    "AgentFileExistsError",
    "AgentFileNotFoundError",
    "AgentIsADirectoryError",
    "AgentNotADirectoryError",
    "AgentPermissionError",
    "BuildError",
    "ConfigError",
    "EmberError",
    "ExecError",
    "GuestCrashed",
    "ImageError",
    "ImageNotBuilt",
    "KvmError",
    "OutputTooLarge",
    "ProtocolError",
    "SandboxCrashed",
    "SandboxError",
    "SandboxLost",
    "SandboxTimeout",
    "SnapshotError",
    "agent_error",
    "require_whole_number",
]


class EmberError(Exception):
    """Base of every error Ember raises deliberately."""


class ConfigError(EmberError):
    """The user asked for something that cannot work (fix the input, retry)."""


class ImageError(ConfigError):
    """A guest kernel or initrd file is malformed or of the wrong kind."""


class ImageNotBuilt(EmberError):
    """A guest artifact is not in the cache yet: run `ember image build`."""


class BuildError(EmberError):
    """Building a guest image failed; the message carries the failing step."""


class KvmError(EmberError):
    """KVM is unavailable or refused an operation."""


class SnapshotError(EmberError):
    """A snapshot cannot be written or restored; the message names the file and the fix."""


class GuestCrashed(EmberError):
    """The guest stopped abnormally; ``reason`` is a one-line description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SandboxError(EmberError):
    """A sandbox could not be started or used."""


class SandboxCrashed(SandboxError):
    """The sandbox's guest kernel panicked or its VMM process died.

    ``console_tail`` holds the last lines of the guest console (and the VMM's
    own one-line stop reason), which usually say why.
    """

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message)
        self.console_tail = console_tail


class SandboxLost(SandboxCrashed):
    """The node that held the sandbox is gone (its daemon unreachable, its Ray node agent dead).

    Raised by :mod:`ember.ray` instead of waiting on a machine that will not answer; the
    sandbox is forgotten by the cluster's registry: make a new one.
    """


# -- the guest agent's answers and the host's bounds on them ----------------------------


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


def require_whole_number(name: str, value: object) -> None:
    """A ConfigError naming ``name`` unless ``value`` is an int (a bool is not one): caught
    where a setting is given, not as a TypeError from the first comparison that uses it."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")


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


# What ``ember`` exports shows as ``ember.X`` in tracebacks and reprs (pickle finds it
# there too: ``ember`` resolves the name on first use).
for _cls in (
    AgentError,
    BuildError,
    ConfigError,
    EmberError,
    ExecError,
    GuestCrashed,
    ImageError,
    ImageNotBuilt,
    KvmError,
    OutputTooLarge,
    ProtocolError,
    SandboxCrashed,
    SandboxError,
    SandboxLost,
    SandboxTimeout,
    SnapshotError,
):
    _cls.__module__ = "ember"
del _cls

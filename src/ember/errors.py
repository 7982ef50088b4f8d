"""Ember's one exception tree.

Every error Ember raises on purpose derives from :class:`EmberError`, so a
caller can catch the whole family with one clause and the CLI can turn any of
them into a one-line message instead of a traceback::

    EmberError
    ├── ConfigError            bad user input: a missing kernel, too little memory, ...
    │   └── ImageError         a kernel/initrd that is not what it claims to be
    ├── ImageNotBuilt          an artifact `ember image build` has not produced yet
    ├── BuildError             building a guest image failed (a command's tail attached)
    ├── KvmError               /dev/kvm is missing, unusable, or an ioctl failed
    ├── SnapshotError          a snapshot is corrupted, from another format version, or unusable
    ├── GuestCrashed           the guest died: KVM internal error, unexpected shutdown
    ├── SandboxError           a sandbox could not be used
    │   └── SandboxCrashed     its guest panicked or its VMM died (carries the console tail)
    └── (ember.client_errors)  AgentError, SandboxTimeout, OutputTooLarge, ProtocolError:
                               the agent's answers and the host's bounds on them

Messages say what to do about the problem, not only what went wrong.
"""

from __future__ import annotations


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

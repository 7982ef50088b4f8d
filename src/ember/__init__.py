"""Ember: microVM sandboxes on KVM behind a hypervisor written in Python.

::

    from ember import Sandbox

    with Sandbox() as sb:
        r = sb.exec(["python3", "-c", "print(6*7)"], timeout=10)
        assert r.stdout == b"42\\n"

The public API is what ``__all__`` lists; everything else is private and may
change.  ``tests/unit/test_public_api.py`` pins it.
"""

from ember.client_errors import (
    AgentError,
    ExecError,
    OutputTooLarge,
    ProtocolError,
    SandboxTimeout,
)
from ember.client_wire import CodeError, CodeResult, DirEntry, ExecResult, FileStat, OutputChunk
from ember.errors import (
    BuildError,
    ConfigError,
    EmberError,
    GuestCrashed,
    ImageError,
    ImageNotBuilt,
    KvmError,
    SandboxCrashed,
    SandboxError,
)
from ember.network.policy import NetworkPolicy
from ember.sandbox import Sandbox
from ember.sandbox_async import AsyncSandbox

__all__ = [
    "AgentError",
    "AsyncSandbox",
    "BuildError",
    "CodeError",
    "CodeResult",
    "ConfigError",
    "DirEntry",
    "EmberError",
    "ExecError",
    "ExecResult",
    "FileStat",
    "GuestCrashed",
    "ImageError",
    "ImageNotBuilt",
    "KvmError",
    "NetworkPolicy",
    "OutputChunk",
    "OutputTooLarge",
    "ProtocolError",
    "Sandbox",
    "SandboxCrashed",
    "SandboxError",
    "SandboxTimeout",
]
__version__ = "0.1.0"

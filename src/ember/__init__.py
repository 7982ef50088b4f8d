"""Ember: microVM sandboxes on KVM behind a hypervisor written in Python.

::

    from ember import Sandbox

    with Sandbox() as sb:
        r = sb.exec(["python3", "-c", "print(6*7)"], timeout=10)
        assert r.stdout == b"42\\n"

The public API is what ``__all__`` lists; everything else is private and may
change.  ``tests/unit/test_public_api.py`` pins it.
"""

from __future__ import annotations

# Not ``from typing import``: ``typing`` costs every ``ember`` CLI process ~3 ms at start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ember.client.results import (
        CodeError,
        CodeResult,
        DirEntry,
        ExecResult,
        FileStat,
        OutputChunk,
    )
    from ember.errors import (
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
    )
    from ember.network.policy import NetworkPolicy
    from ember.sandbox import AsyncSandbox, Sandbox, keep_warm

# Names are imported on first use (PEP 562): `import ember.X` for one submodule (the CLI, the
# zygote, the VMM) must not pay ~0.2 s for the SDK's asyncio, clients and templates.
_LAZY: dict[str, str] = {
    "AgentError": "ember.errors",
    "AsyncSandbox": "ember.sandbox",
    "BuildError": "ember.errors",
    "CodeError": "ember.client.results",
    "CodeResult": "ember.client.results",
    "ConfigError": "ember.errors",
    "DirEntry": "ember.client.results",
    "EmberError": "ember.errors",
    "ExecError": "ember.errors",
    "ExecResult": "ember.client.results",
    "FileStat": "ember.client.results",
    "GuestCrashed": "ember.errors",
    "ImageError": "ember.errors",
    "ImageNotBuilt": "ember.errors",
    "KvmError": "ember.errors",
    "NetworkPolicy": "ember.network.policy",
    "OutputChunk": "ember.client.results",
    "OutputTooLarge": "ember.errors",
    "ProtocolError": "ember.errors",
    "Sandbox": "ember.sandbox",
    "SandboxCrashed": "ember.errors",
    "SandboxError": "ember.errors",
    "SandboxLost": "ember.errors",
    "SandboxTimeout": "ember.errors",
    "SnapshotError": "ember.errors",
    "keep_warm": "ember.sandbox",
}


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
    "SandboxLost",
    "SandboxTimeout",
    "SnapshotError",
    "keep_warm",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

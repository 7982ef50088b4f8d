"""The sandbox facades: :class:`Sandbox` (blocking) and :class:`AsyncSandbox` (asyncio).

=================  ==============================================================
``options``        the arguments the facades share (``SandboxOptions``, ``ExecArgs``)
``signature``      ``takes``: a method whose parameters are an options type's
``sync``           ``Sandbox``: an in-process VMM, blocking calls
``aio``            ``AsyncSandbox``: the same, awaitable
``files``          ``sb.files`` of the four facades (and the daemon's file requests)
``spares``         sandboxes restored and warmed ahead of time (``keep_warm``), kept in a
                   ``spare_pool``
``daemon``         an ``ember serve`` daemon's HTTP API, without I/O
``remote``         ``RemoteSandbox``: ``Sandbox(server=...)`` over ``httpx.Client``
``remote_async``   ``AsyncRemoteSandbox``: ``AsyncSandbox(server=...)``, asyncio
=================  ==============================================================

Both facades take the same arguments (one :class:`~ember.sandbox.options.SandboxOptions`)
and have the same names and signatures; ``tests/unit/test_sandbox_parity.py`` holds them to it.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.errors import SandboxCrashed
    from ember.sandbox.aio import AsyncSandbox
    from ember.sandbox.files import AsyncSandboxFiles, SandboxFiles
    from ember.sandbox.spares import keep_warm
    from ember.sandbox.sync import Sandbox

# Imported on first use (PEP 562), as in ``ember``: blocking users do not pay for asyncio.
_LAZY = {
    "AsyncSandbox": "ember.sandbox.aio",
    "AsyncSandboxFiles": "ember.sandbox.files",
    "Sandbox": "ember.sandbox.sync",
    "SandboxCrashed": "ember.errors",
    "SandboxFiles": "ember.sandbox.files",
    "keep_warm": "ember.sandbox.spares",
}

__all__ = [
    "AsyncSandbox", "AsyncSandboxFiles", "Sandbox", "SandboxCrashed", "SandboxFiles", "keep_warm",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ember.sandbox' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

"""The public API is exactly ``ember.__all__``: adding or dropping a name is a decision."""

from __future__ import annotations

import ember

EXPECTED = [
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


def test_all_is_pinned_and_sorted() -> None:
    assert ember.__all__ == EXPECTED == sorted(EXPECTED)
    for name in ember.__all__:
        assert hasattr(ember, name), name


def test_every_error_is_an_ember_error() -> None:
    for name in ember.__all__:
        obj = getattr(ember, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, ember.EmberError), name


def test_sync_and_async_sandboxes_have_the_same_names() -> None:
    public = {n for n in dir(ember.Sandbox) if not n.startswith("_")}
    public_async = {n for n in dir(ember.AsyncSandbox) if not n.startswith("_")}
    assert public - {"start"} == public_async - {"start"}

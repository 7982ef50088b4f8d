"""The blocking and asyncio clients offer the same calls with the same signatures.

They are two transports over one core (``ember.client.core``), so a name or a parameter
added to one and not the other is drift: this test fails on it. Coroutines versus plain
functions aside, and the asyncio classes' ``Async`` names in annotations.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from ember.client import (
    AgentClient,
    AsyncAgentClient,
    AsyncExecStream,
    AsyncFiles,
    ExecStream,
    Files,
)

# A stream is iterated with ``for`` in one and ``async for`` in the other.
STREAM_TWINS = {
    "__iter__": "__aiter__",
    "__next__": "__anext__",
    "__enter__": "__aenter__",
    "__exit__": "__aexit__",
    "close": "aclose",
}
PAIRS = [(AgentClient, AsyncAgentClient, {}), (Files, AsyncFiles, {}),
         (ExecStream, AsyncExecStream, STREAM_TWINS)]  # fmt: skip


def public(cls: type, extra: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    own = {n for klass in cls.__mro__ if klass is not object for n in vars(klass)}  # and bases'
    names = {n for n in own if not n.startswith("_")} | (own & extra)
    return {name: inspect.getattr_static(cls, name) for name in names}


def shape(member: Any) -> object:
    """What must agree: a function's parameters (names, kinds, defaults, annotations)
    and return annotation with ``Async`` dropped; a property or attribute as itself."""
    if isinstance(member, property):
        return ("property", _plain(str(inspect.signature(member.fget).return_annotation)))
    if not callable(member):
        return ("attribute", type(member).__name__)
    sig = inspect.signature(member)
    params = [
        (p.name, p.kind, repr(p.default), _plain(str(p.annotation)))
        for p in list(sig.parameters.values())[1:]  # self
    ]
    return ("function", params, _plain(str(sig.return_annotation)))


def _plain(annotation: str) -> str:
    return annotation.replace("AsyncAgentClient", "AgentClient").replace("Async", "")


def differences(sync: type, asyncio_: type, twins: dict[str, str]) -> list[str]:
    """What differs between the public surfaces of ``sync`` and ``asyncio_``."""
    ours = public(sync, set(twins))
    theirs = public(asyncio_, set(twins.values()))
    renamed = {twins.get(name, name): member for name, member in ours.items()}
    found = [f"{name}: only in {sync.__name__}" for name in sorted(set(renamed) - set(theirs))]
    found += [f"{name}: only in {asyncio_.__name__}" for name in sorted(set(theirs) - set(renamed))]
    for name in sorted(set(renamed) & set(theirs)):
        if shape(renamed[name]) != shape(theirs[name]):
            found.append(f"{name}: {shape(renamed[name])} != {shape(theirs[name])}")
        if inspect.iscoroutinefunction(renamed[name]):
            found.append(f"{name}: a coroutine in {sync.__name__}")
    return found


@pytest.mark.parametrize(("sync", "asyncio_", "twins"), PAIRS)
def test_sync_and_async_expose_the_same_names_and_signatures(
    sync: type, asyncio_: type, twins: dict[str, str]
) -> None:
    assert differences(sync, asyncio_, twins) == []


def test_the_async_calls_that_do_io_are_coroutines() -> None:
    for name in ("ping", "exec", "run_code", "shutdown", "close"):
        assert inspect.iscoroutinefunction(getattr(AsyncAgentClient, name)), name
    assert not inspect.iscoroutinefunction(AsyncAgentClient.exec_stream)  # returns a stream
    for name in ("write", "read", "read_into", "stat", "list", "remove"):
        assert inspect.iscoroutinefunction(getattr(AsyncFiles, name)), name


def test_drift_is_caught() -> None:
    class Sync:
        def ping(self) -> dict[str, Any]:
            return {}

        def exec(self, cmd: str, *, timeout: float | None = None) -> int:
            return 0

        def only_here(self) -> None:
            pass

    class Async:
        async def ping(self) -> dict[str, Any]:
            return {}

        async def exec(self, cmd: str, *, timeout: float | None = 5.0) -> int:
            return 0

    found = differences(Sync, Async, {})
    assert any(line.startswith("only_here: only in Sync") for line in found)
    assert any(line.startswith("exec:") for line in found)  # a default drifted
    assert not any(line.startswith("ping") for line in found)


def test_both_clients_carry_files_and_the_same_instance_attributes() -> None:
    async def aconnect() -> Any:
        raise AssertionError("not called")

    sync, asyncio_ = AgentClient(lambda: None), AsyncAgentClient(aconnect)  # type: ignore[arg-type,return-value]
    assert type(sync.files) is Files and type(asyncio_.files) is AsyncFiles
    assert {n for n in vars(sync) if not n.startswith("_")} == {
        n for n in vars(asyncio_) if not n.startswith("_")
    }

"""The sandbox facades stay twins: same public names, same signatures (issue 13, item 2).

``Sandbox`` and ``AsyncSandbox`` (and their ``files``), ``RemoteSandbox`` and
``AsyncRemoteSandbox`` (and theirs) differ only in that one awaits; a daemon's
sandbox takes what the in-process one takes wherever both offer a method.  A
parameter added to one twin and not the other fails here.  No KVM needed.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest

from ember.sandbox import AsyncSandbox, AsyncSandboxFiles, Sandbox, SandboxFiles
from ember.sandbox.remote import RemoteFiles, RemoteSandbox
from ember.sandbox.remote_async import AsyncRemoteFiles, AsyncRemoteSandbox

TWINS = [
    (Sandbox, AsyncSandbox),
    (SandboxFiles, AsyncSandboxFiles),
    (RemoteSandbox, AsyncRemoteSandbox),
    (RemoteFiles, AsyncRemoteFiles),
]
LOCAL_AND_REMOTE = [
    (Sandbox, RemoteSandbox),
    (AsyncSandbox, AsyncRemoteSandbox),
    (SandboxFiles, RemoteFiles),
    (AsyncSandboxFiles, AsyncRemoteFiles),
]
ONLY_ASYNC = {"start"}  # ``async with`` starts it; a Sandbox is started by its constructor
PLAIN_IN_ASYNC = {"listen"}  # a listening socket for ``loop.sock_accept``: nothing to await


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def unasync(text: str) -> str:
    """An async twin's annotation as the blocking twin writes it."""
    return re.sub(r"\bAsync(?=[A-Z])", "", text)


def shape(cls: type, name: str) -> tuple[str, Any]:
    """What a name is on a class, and its call signature where it has one."""
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, property):
        return "property", None
    kind = type(raw).__name__ if isinstance(raw, staticmethod | classmethod) else "method"
    value = getattr(cls, name)  # for a descriptor (``connect``), what the class gives
    sig = inspect.signature(value)
    params = [
        (p.name, p.kind, p.default, unasync(str(p.annotation))) for p in sig.parameters.values()
    ]
    return kind, (params, unasync(str(sig.return_annotation)))


@pytest.mark.parametrize(("sync", "aio"), TWINS, ids=lambda c: c.__name__)
def test_the_async_twin_has_the_same_names(sync: type, aio: type) -> None:
    assert public(sync) == public(aio) - ONLY_ASYNC


@pytest.mark.parametrize(("sync", "aio"), TWINS, ids=lambda c: c.__name__)
def test_the_async_twin_has_the_same_signatures(sync: type, aio: type) -> None:
    for name in sorted(public(sync) | {"__init__"}):
        assert shape(sync, name) == shape(aio, name), f"{sync.__name__}.{name}"


@pytest.mark.parametrize(("sync", "aio"), TWINS, ids=lambda c: c.__name__)
def test_the_async_twin_awaits_and_the_blocking_one_does_not(sync: type, aio: type) -> None:
    for name in sorted(public(sync)):
        raw = inspect.getattr_static(sync, name)
        if isinstance(raw, property) or not callable(getattr(sync, name)):
            continue
        if name == "connect":  # the class's attach and the instance's connect: both below
            continue
        func, afunc = getattr(sync, name), getattr(aio, name)
        assert not (inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)), name
        awaits = inspect.iscoroutinefunction(afunc) or inspect.isasyncgenfunction(afunc)
        assert awaits != (name in PLAIN_IN_ASYNC), f"{aio.__name__}.{name}"


def test_connect_is_attach_on_the_class_and_a_port_on_an_instance() -> None:
    assert inspect.iscoroutinefunction(AsyncSandbox.connect)  # the class's: attach by id
    assert inspect.iscoroutinefunction(AsyncSandbox._connect_port)  # an instance's: a port
    _, (params, _) = shape(Sandbox, "_connect_port")
    _, (aparams, _) = shape(AsyncSandbox, "_connect_port")
    assert params == aparams


@pytest.mark.parametrize(("local", "remote"), LOCAL_AND_REMOTE, ids=lambda c: c.__name__)
def test_a_daemons_sandbox_takes_what_the_in_process_one_takes(local: type, remote: type) -> None:
    shared = public(local) & public(remote)
    assert public(local) <= public(remote)  # all of it (some refuse: not through a daemon yet)
    constructor = {"__init__"} if hasattr(local, "connect") else set()  # files: made for one
    for name in sorted(shared | constructor):
        if isinstance(inspect.getattr_static(local, name), property):
            continue  # e.g. ``id``: ``str | None`` in-process, ``str`` of a daemon
        (kind, (params, _)), (rkind, (rparams, _)) = shape(local, name), shape(remote, name)
        # the same parameters; a return may narrow (``start() -> AsyncRemoteSandbox``)
        assert (kind, params) == (rkind, rparams), f"{remote.__name__}.{name}"


def test_the_constructors_take_the_options_type() -> None:
    from ember.sandbox.options import SandboxOptions

    options = list(inspect.signature(SandboxOptions).parameters)
    for cls in (Sandbox, AsyncSandbox, RemoteSandbox, AsyncRemoteSandbox):
        assert list(inspect.signature(cls.__init__).parameters) == ["self", *options], cls


def test_closing_an_async_facade_stream_closes_the_method_s_own_at_once() -> None:
    """``await sb.exec_stream(...).aclose()`` must hang up then and there (and give the
    exec's ring slot back), not whenever the generator inside is collected."""
    import asyncio

    from ember.sandbox.options import StreamArgs
    from ember.sandbox.signature import takes

    closed: list[str] = []

    class Facade:
        @takes(StreamArgs)
        async def exec_stream(self, a: StreamArgs) -> Any:
            try:
                yield a.cmd
                yield "never"
            finally:
                closed.append("inner")

    async def main() -> None:
        stream = Facade().exec_stream("echo hi")
        assert await stream.__anext__() == "echo hi"
        await stream.aclose()
        assert closed == ["inner"]  # without aclosing: only once the loop's GC hook runs

    asyncio.run(main())

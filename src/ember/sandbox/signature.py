"""Signatures written once: a method whose public parameters are an options type's.

The four facades (:class:`~ember.sandbox.Sandbox`, its asyncio twin and their
daemon clients) take the same arguments for the same things: the sandbox's shape
on construction, ``cmd, *, timeout, env, cwd, stdin`` for a command.  Each set is
one dataclass in :mod:`ember.sandbox.options`; a facade's method says which with
:func:`takes` and receives one built instance::

    @takes(ExecArgs)
    def exec(self, args: ExecArgs) -> ExecResult: ...

    sb.exec(["true"], timeout=5)    # what callers write, checked by mypy as ExecArgs(...)

Callers, mypy (through the ``ParamSpec``) and ``inspect.signature`` see the
options type's parameters; a coroutine (or async generator) stays one, so
``inspect`` tells the async facades' methods apart as before.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")
A = TypeVar("A")


def _same_kind(model: Callable[..., Any], body: Callable[..., Any]) -> Callable[..., Any]:
    """``body`` as a function of ``model``'s kind: plain, coroutine or async generator."""
    if inspect.isasyncgenfunction(model):

        async def agen(*args: Any, **kwargs: Any) -> Any:
            # aclosing: closing this generator closes the method's at once (an exec stream
            # hangs up and gives its ring slot back), not whenever it is collected.
            async with contextlib.aclosing(body(*args, **kwargs)) as inner:
                async for item in inner:
                    yield item

        return agen
    if inspect.iscoroutinefunction(model):

        async def coro(*args: Any, **kwargs: Any) -> Any:
            return await body(*args, **kwargs)

        return coro
    return body


def takes(
    options: Callable[P, A],
) -> Callable[[Callable[[S, A], R]], Callable[Concatenate[S, P], R]]:
    """Give the decorated method ``(self, options_instance)`` the parameters of ``options``."""

    def decorate(method: Callable[[S, A], R]) -> Callable[Concatenate[S, P], R]:
        def build(self: S, /, *args: Any, **kwargs: Any) -> Any:
            return method(self, options(*args, **kwargs))

        wrapper = functools.update_wrapper(_same_kind(method, build), method)
        del wrapper.__wrapped__  # inspect would show (self, args) again
        public = inspect.signature(options)
        self_param = next(iter(inspect.signature(method).parameters.values()))
        wrapper.__signature__ = public.replace(  # type: ignore[attr-defined]
            parameters=[self_param, *public.parameters.values()],
            return_annotation=inspect.signature(method).return_annotation,
        )
        return cast(Callable[Concatenate[S, P], R], wrapper)

    return decorate


def refused(model: Callable[P, R], what: str, why: str) -> Callable[P, R]:
    """A method with ``model``'s signature (and kind) that raises ``SandboxError``:
    ``what`` is not offered here, ``why`` says what to do instead."""
    from ember.errors import SandboxError

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise SandboxError(f"{what} is not available {why}")

    wrapper = functools.update_wrapper(_same_kind(model, refuse), model)
    del wrapper.__wrapped__
    wrapper.__signature__ = inspect.signature(model)  # type: ignore[attr-defined]
    return cast(Callable[P, R], wrapper)

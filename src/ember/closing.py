"""``with thing:`` for the SDK's objects that own a connection, a thread or a mapping.

Streams, watches, terminals, channel servers and sandboxes each end with ``close()``;
this base gives them the context-manager half once, so ``__exit__`` cannot drift from
``close`` in one of them. (The guest agent keeps its own: it imports nothing of the host.)
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncClosing", "Closing"]


class Closing:
    """``__enter__`` returns the object; ``__exit__`` calls :meth:`close`, whatever happened."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClosing:
    """The same for asyncio's objects: ``async with thing:`` awaits :meth:`close`."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

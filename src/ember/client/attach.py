"""The blocking client a host process makes for a VMM it drives: one construction for all.

A sandbox's facade, a spare being warmed and a template build recording its first call all
talk to a VMM the same way: one lazily mapped :class:`~ember.client.shm.LazyRegion` shared by
channels, code rings and file transfers, a :class:`~ember.client.code_ring.CodeRing` that
expects a polling worker when the VM was restored, and an
:class:`~ember.client.blocking.AgentClient` that takes over the snapshot's connection and
announces the resume. Built in one place, the first call a template records is the first call
a sandbox makes by construction, not by copying. (The asyncio facade builds its own: its VMM
arrives later and its transports differ.)

The VMM is described by :class:`Driven` rather than imported, so the client does not depend on
the launcher.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ember.client.blocking import AgentClient
from ember.client.code_ring import CodeRing
from ember.client.shm import HostRegion, LazyRegion

__all__ = ["Attachment", "Driven", "attach"]


class Driven(Protocol):
    """What the client needs of a VMM (:class:`ember.launcher.VmmProcess` is one)."""

    @property
    def restored(self) -> bool:
        """Started from a snapshot (whose code worker was likely left polling)."""
        ...

    def connect(self, port: int = ...) -> socket.socket: ...

    def resume(self, port: int = ...) -> socket.socket | None: ...

    def exited(self) -> bool: ...

    def shm_region(self) -> HostRegion | None: ...


@dataclass(frozen=True)
class Attachment:
    """The three parts; :meth:`close` ends the client's connections and unmaps the region."""

    region: LazyRegion
    code_ring: CodeRing
    client: AgentClient

    def close(self) -> None:
        self.client.close()
        self.code_ring.close()
        self.region.close()


def attach(
    vmm: Driven, connect: Callable[[], socket.socket] | None = None, *, new_vm: bool = True
) -> Attachment:
    """The client for ``vmm``; ``connect`` replaces ``vmm.connect`` (a facade's checks it is
    still open first). ``new_vm=False`` for a VM that has run for another host process (a
    daemon adopting it): no snapshot connection to take over, no resume to announce."""
    region = LazyRegion(vmm.shm_region)
    code_ring = CodeRing(region, alive=lambda: not vmm.exited(), expect=vmm.restored)
    client = AgentClient(
        connect or vmm.connect,
        resume=vmm.resume if new_vm else None,
        announce_resume=new_vm,
        code_ring=code_ring,
        shm=region,
    )
    return Attachment(region, code_ring, client)

"""Each networked sandbox's DNS resolver: allowed names are answered and their addresses opened.

A guest's ``/etc/resolv.conf`` names its gateway, 172.16.0.1 (ember-init
writes it for every networked guest, so it is part of the networked
template).  There, in the sandbox's namespace, the resolver listens on UDP
and TCP port 53 with sockets made in that namespace by a short-lived
thread; the resolving itself happens in the host namespace, in one asyncio
loop per host process (a daemon thread) that serves every sandbox of the
process.

This module starts and stops one sandbox's resolver on that loop.  Its
parts: :mod:`ember.network.answers` decides what each query gets and opens
the addresses of allowed names, :mod:`ember.network.upstream` asks the
upstream resolver, and :mod:`ember.network.dns_server` serves the guest's
sockets within the limits an adversarial guest calls for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import threading
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

from ember.errors import ConfigError
from ember.network.answers import Element as Element  # re-exported: the resolver's API
from ember.network.answers import Resolver as Resolver
from ember.network.answers import SetWriter
from ember.network.dns_server import _Load, _SandboxServer
from ember.network.dns_server import guest_sockets as guest_sockets
from ember.network.policy import NetworkPolicy
from ember.network.upstream import RESOLV_CONF
from ember.network.upstream import host_upstream as host_upstream

DNS_PORT = 53
NFT_WORKERS = 4  # nft runs at once, for all sandboxes of the process
CALL_TIMEOUT_S = 10.0

T = TypeVar("T")


class _Service:
    """The asyncio loop (a daemon thread) serving every sandbox resolver of this process."""

    def __init__(self) -> None:
        self.load = _Load()
        self.loop = asyncio.new_event_loop()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            NFT_WORKERS, thread_name_prefix="ember-dns-nft"
        )
        self.pid = os.getpid()
        thread = threading.Thread(target=self.loop.run_forever, name="ember-dns", daemon=True)
        thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT_S)


_service: _Service | None = None
_service_lock = threading.Lock()


def _get_service() -> _Service:
    global _service
    with _service_lock:
        if _service is None or _service.pid != os.getpid():  # a forked child has no thread
            _service = _Service()
        return _service


class SandboxResolver:
    """A running resolver for one sandbox; :meth:`close` stops it and closes its sockets."""

    def __init__(self, server: _SandboxServer, service: _Service) -> None:
        self._server: _SandboxServer | None = server
        self._service = service

    @property
    def stats(self) -> Counter[str]:
        return self._server.resolver.stats if self._server is not None else Counter()

    @classmethod
    def start(
        cls,
        netns_path: str,
        policy: NetworkPolicy,
        write_sets: SetWriter,
        *,
        address: str,
        guest_ip: str,
        port: int = DNS_PORT,
        sockets: tuple[socket.socket, socket.socket] | None = None,
    ) -> SandboxResolver:
        """Serve ``policy``'s names on ``address:port`` in the namespace at ``netns_path``
        (on ``sockets``, UDP and TCP, if given: bound there ahead of time, taken over)."""
        upstream = policy.dns_upstream or host_upstream()
        if upstream is None and policy.names:
            if sockets is not None:
                for sock in sockets:
                    sock.close()
            raise ConfigError(
                f"the policy allows names ({policy.names[0]}, ...) but {RESOLV_CONF} names "
                "no IPv4 nameserver to ask: add one there, or pass "
                "NetworkPolicy(..., dns_upstream='ADDR')"
            )
        udp, tcp = sockets if sockets is not None else guest_sockets(netns_path, address, port)
        service = _get_service()
        try:
            resolver = Resolver(policy, upstream, write_sets, service.executor)
            server = service.call(_make_server(resolver, guest_ip, service.load, udp, tcp))
        except BaseException:
            udp.close()
            tcp.close()
            raise
        return cls(server, service)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                self._service.call(server.stop())


async def _make_server(
    resolver: Resolver, guest_ip: str, load: _Load, udp: socket.socket, tcp: socket.socket
) -> _SandboxServer:
    server = _SandboxServer(resolver, guest_ip, load)
    await server.start(udp, tcp)
    return server

"""One sandbox's resolver sockets, served: the half of the resolver the guest talks to.

The sockets are bound in the sandbox's namespace by a short-lived thread
(:func:`guest_sockets`: network namespaces are per thread) and served from
the host namespace, by the loop of :mod:`ember.network.resolver`.

The guest is an adversary: only its own address is answered (the sandbox's
input chain also accepts port 53 from it alone, so the resolver cannot
reflect answers at anyone else), a query is at most 512 bytes, at most
``MAX_PENDING`` are in flight and ``MAX_TCP`` TCP connections open per
sandbox (``MAX_PENDING_TOTAL`` queries for all sandboxes of the process, so
that guests together cannot exhaust its file descriptors with upstream
sockets).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, cast

from ember.errors import SandboxError
from ember.network import dns
from ember.network.answers import Resolver
from ember.network.netns import set_net_namespace

log = logging.getLogger("ember.network.resolver")  # one logger for all of the resolver

MAX_PENDING = 32  # queries of one sandbox being resolved at once; more are dropped
MAX_PENDING_TOTAL = 256  # the same for every sandbox of the process together
MAX_TCP = 4  # TCP connections one sandbox may hold open to its resolver
TCP_IDLE_S = 10.0
MAX_TCP_ANSWER = 65535


class _GuestUdp(asyncio.DatagramProtocol):
    """Queries from the guest over UDP: answered concurrently, up to MAX_PENDING."""

    def __init__(self, server: _SandboxServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()  # set once the socket is

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # what asyncio makes

    def datagram_received(self, data: bytes, addr: Any) -> None:
        server = self.server
        if addr[0] != server.guest_ip or len(data) > dns.MAX_QUERY:
            server.resolver.stats["dropped"] += 1
            return
        if server.pending >= MAX_PENDING or server.load.pending >= MAX_PENDING_TOTAL:
            server.resolver.stats["busy"] += 1
            return
        server.spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: Any) -> None:
        reply = await self.server.handle(data, tcp=False)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # e.g. the guest's port unreachable: nothing to do

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _SandboxServer:
    """One sandbox's listening sockets and the tasks answering on them."""

    def __init__(self, resolver: Resolver, guest_ip: str, load: _Load) -> None:
        self.resolver = resolver
        self.guest_ip = guest_ip
        self.load = load
        self.pending = 0
        self.connections = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.udp: asyncio.DatagramTransport | None = None
        self.udp_protocol: _GuestUdp | None = None
        self.tcp: asyncio.Server | None = None

    async def start(self, udp: socket.socket, tcp: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.udp, self.udp_protocol = await loop.create_datagram_endpoint(
            lambda: _GuestUdp(self), sock=udp
        )
        self.tcp = await asyncio.start_server(self._serve_tcp, sock=tcp, limit=4096)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, data: bytes, *, tcp: bool) -> bytes | None:
        """The resolver's reply; an unexpected error drops the query, never the server."""
        self.pending += 1
        self.load.pending += 1
        try:
            return await self.resolver.handle(data, tcp=tcp)
        except Exception:
            log.exception("the sandbox DNS resolver failed on a query")
            self.resolver.stats["errors"] += 1
            return None
        finally:
            self.pending -= 1
            self.load.pending -= 1

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not peer or peer[0] != self.guest_ip or self.connections >= MAX_TCP:
            self.resolver.stats["dropped"] += 1
            writer.close()
            return
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            while True:  # one query at a time: a guest cannot pile them up on one connection
                prefix = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S)
                (length,) = struct.unpack("!H", prefix)
                if length > dns.MAX_QUERY:
                    self.resolver.stats["dropped"] += 1
                    break
                data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_S)
                reply = await self.handle(data, tcp=True)
                if reply is None or len(reply) > MAX_TCP_ANSWER:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await asyncio.wait_for(writer.drain(), TCP_IDLE_S)
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            self.connections -= 1
            if task is not None:
                self.tasks.discard(task)
            writer.close()

    async def stop(self) -> None:
        """Close every socket before returning: one left open would keep the sandbox's
        namespace, and with it its veth, alive after ``ip netns delete``."""
        if self.tcp is not None:
            self.tcp.close()  # closes the listening socket at once
        for task in list(self.tasks):
            task.cancel()  # each connection's socket closes in its handler's finally
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.udp is not None and self.udp_protocol is not None:
            self.udp.close()  # the socket closes on the loop's next turn: wait for that
            await self.udp_protocol.closed
        await asyncio.sleep(0)  # let the connections' transports finish closing


class _Load:
    """What all sandboxes of the process have in flight (touched on the loop's thread only)."""

    pending = 0


def guest_sockets(netns_path: str, address: str, port: int) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets bound to ``address:port`` in the namespace at ``netns_path``.

    A socket belongs to the namespace it was made in for its whole life, so a
    thread enters the namespace (network namespaces are per thread), makes
    them and ends; the sockets are then served from the host namespace.
    """
    made: list[socket.socket] = []
    failure: list[BaseException] = []

    def make() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                set_net_namespace(fd)
            finally:
                os.close(fd)
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                sock = socket.socket(socket.AF_INET, kind)
                made.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(MAX_TCP)
                sock.setblocking(False)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=make, name="ember-dns-netns")
    thread.start()
    thread.join()
    if failure:
        for sock in made:
            sock.close()
        raise SandboxError(
            f"cannot serve DNS on {address}:{port} in {netns_path}: {failure[0]}"
        ) from failure[0]
    return made[0], made[1]

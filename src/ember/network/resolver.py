"""Each networked sandbox's DNS resolver: allowed names are answered and their addresses opened.

A guest's ``/etc/resolv.conf`` names its gateway, 172.16.0.1 (ember-init
writes it for every networked guest, so it is part of the networked
template).  There, in the sandbox's namespace, this module listens on UDP
and TCP port 53 with sockets made in that namespace by a short-lived
thread; the resolving itself happens in the host namespace, in one asyncio
loop per host process (a daemon thread) that serves every sandbox of the
process.  For each query:

- a name the policy allows (:meth:`NetworkPolicy.resolves`) is asked of the
  upstream resolver (the policy's ``dns_upstream`` or the host's
  ``/etc/resolv.conf``) in a query of the resolver's own, and the answer's
  IPv4 addresses for that name are added to the sets of the name entries
  that allow it, for the answer's TTL (at least ``MIN_OPEN_S``), *before*
  the guest has the answer, so its first connection is not refused;
- any other name is answered NXDOMAIN; zone transfers and ANY, NOTIMP;
- a message that is not a query is dropped, a query that cannot be read
  gets FORMERR.

The guest is an adversary: only its own address is answered (the sandbox's
input chain also accepts port 53 from it alone, so the resolver cannot
reflect answers at anyone else), a query is at most 512 bytes, at most
``MAX_PENDING`` are in flight and ``MAX_TCP`` TCP connections open per
sandbox (``MAX_PENDING_TOTAL`` queries for all sandboxes of the process, so
that guests together cannot exhaust its file descriptors with upstream
sockets), replies over UDP are at most 512 bytes (no amplification), and
an address already open for long enough costs no ``nft`` run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from ember.errors import ConfigError, SandboxError
from ember.network import dns
from ember.network.netns import set_net_namespace
from ember.network.policy import NetworkPolicy, parse_upstream

log = logging.getLogger(__name__)

DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"
MIN_OPEN_S = 60  # an address stays open at least this long: clients use answers a bit past TTL
MAX_TTL_S = 86400  # longer TTLs are cut to this, in the answer the guest gets too
UPSTREAM_TIMEOUT_S = 2.0
UPSTREAM_TRIES = 2  # over UDP; then SERVFAIL (the guest's stub asks again on its own)
MAX_PENDING = 32  # queries of one sandbox being resolved at once; more are dropped
MAX_PENDING_TOTAL = 256  # the same for every sandbox of the process together
MAX_TCP = 4  # TCP connections one sandbox may hold open to its resolver
TCP_IDLE_S = 10.0
MAX_TCP_ANSWER = 65535
NFT_WORKERS = 4  # nft runs at once, for all sandboxes of the process
CALL_TIMEOUT_S = 10.0

# (set name, address, seconds): opens ``address`` in that set of the sandbox's table.
Element = tuple[str, ipaddress.IPv4Address, int]
SetWriter = Callable[[Sequence[Element]], None]
T = TypeVar("T")


def host_upstream(path: str = RESOLV_CONF) -> tuple[str, int] | None:
    """The first IPv4 ``nameserver`` of the host's resolv.conf, or None."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            with contextlib.suppress(ConfigError):
                return parse_upstream(fields[1])
    return None


class Resolver:
    """The resolver's decisions for one sandbox: a guest's message in, the reply out.

    No sockets of the guest's here (the server around it has them), so it
    can be tested with bytes; upstream queries go out from the host.
    """

    def __init__(
        self,
        policy: NetworkPolicy,
        upstream: tuple[str, int] | None,
        write_sets: SetWriter,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.policy = policy
        self.upstream = upstream
        self.write_sets = write_sets
        self.executor = executor
        self.stats: Counter[str] = Counter()
        self._open_until: dict[tuple[str, ipaddress.IPv4Address], float] = {}
        self._set_lock = asyncio.Lock()  # one nft run at a time per sandbox
        self._warned: set[str] = set()

    async def handle(self, data: bytes, *, tcp: bool) -> bytes | None:
        """The reply to ``data`` from the guest, or None to send nothing."""
        try:
            question = dns.parse_query(data)
        except dns.DnsFormatError:
            formerr = dns.format_error(data)
            self.stats["formerr" if formerr else "dropped"] += 1
            return formerr
        if question.opcode != 0:
            return self._refuse(question, dns.Rcode.NOTIMP)
        if question.name is None or not self.policy.resolves(question.name):
            return self._refuse(question, dns.Rcode.NXDOMAIN)
        if question.qclass != dns.CLASS_IN or question.qtype in dns.UNSERVED_TYPES:
            return self._refuse(question, dns.Rcode.NOTIMP)
        if self.upstream is None:
            return self._refuse(question, dns.Rcode.SERVFAIL)
        try:
            answer = await self._ask(question.name, question.qtype)
        except (OSError, TimeoutError, dns.DnsFormatError) as exc:
            self._log("upstream", "DNS upstream %s failed for %s: %s", self.upstream,
                      question.name, exc)  # fmt: skip
            return self._refuse(question, dns.Rcode.SERVFAIL)
        entries = self.policy.matching(question.name)
        if entries and answer.addresses and answer.rcode == dns.Rcode.NOERROR:
            try:
                await self._open({e.set_name for e in entries}, answer.addresses)
            except (OSError, SandboxError) as exc:
                self._log("nft", "could not open %s for %s: %s", list(answer.addresses),
                          question.name, exc)  # fmt: skip
                return self._refuse(question, dns.Rcode.SERVFAIL)
        self.stats["answered"] += 1
        return dns.relay(question, answer, limit=None if tcp else dns.MAX_UDP_REPLY)

    def _log(self, kind: str, message: str, *args: object) -> None:
        """A warning the first time, then debug: a guest must not flood the host's logs."""
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, message, *args)

    def _refuse(self, question: dns.Question, rcode: dns.Rcode) -> bytes:
        self.stats[rcode.name.lower()] += 1
        return dns.reply(question, rcode)

    async def _ask(self, name: str, qtype: int) -> dns.Answer:
        """The upstream's answer: over UDP, over TCP if that came back truncated."""
        assert self.upstream is not None
        ident = secrets.randbelow(1 << 16)
        query = dns.build_query(ident, name, qtype, dns.CLASS_IN)
        data = b""
        for _ in range(UPSTREAM_TRIES):
            try:
                data = await _udp_exchange(self.upstream, query, ident)
                break
            except TimeoutError:
                continue
        else:
            raise TimeoutError(f"no answer in {UPSTREAM_TRIES} tries")
        answer = dns.parse_answer(data, ident, name, qtype, dns.CLASS_IN, max_ttl=MAX_TTL_S)
        if answer.truncated:
            data = await _tcp_exchange(self.upstream, query)
            answer = dns.parse_answer(data, ident, name, qtype, dns.CLASS_IN, max_ttl=MAX_TTL_S)
        return answer

    async def _open(self, sets: set[str], addresses: dict[ipaddress.IPv4Address, int]) -> None:
        """Open each address in each set for its TTL (at least MIN_OPEN_S), skipping those
        already open for at least half of that: a guest asking again costs no nft run."""
        loop = asyncio.get_running_loop()
        async with self._set_lock:
            now = loop.time()
            wanted: list[Element] = []
            for set_name in sorted(sets):
                for address, ttl in addresses.items():
                    seconds = max(MIN_OPEN_S, ttl)
                    if self._open_until.get((set_name, address), 0.0) - now >= seconds / 2:
                        continue
                    wanted.append((set_name, address, seconds))
            if not wanted:
                return
            await loop.run_in_executor(self.executor, self.write_sets, wanted)
            self.stats["nft"] += 1
            for set_name, address, seconds in wanted:
                self._open_until[(set_name, address)] = now + seconds
            if len(self._open_until) > 4 * len(wanted) + 1024:  # forget what has expired
                self._open_until = {k: t for k, t in self._open_until.items() if t > now}


class _UpstreamUdp(asyncio.DatagramProtocol):
    def __init__(self, ident: int, done: asyncio.Future[bytes]) -> None:
        self.ident = ident
        self.done = done

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.done.done() or len(data) < dns.HEADER_SIZE:
            return
        ident, flags = struct.unpack_from("!HH", data)
        if ident == self.ident and flags & dns.QR:  # anything else: not ours, keep waiting
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def _udp_exchange(server: tuple[str, int], query: bytes, ident: int) -> bytes:
    """Send ``query`` from a fresh port (connected: only the server's datagrams arrive)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UpstreamUdp(ident, done), remote_addr=server
    )
    try:
        transport.sendto(query)
        return await asyncio.wait_for(done, UPSTREAM_TIMEOUT_S)
    finally:
        transport.close()


async def _tcp_exchange(server: tuple[str, int], query: bytes) -> bytes:
    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(*server)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(exchange(), UPSTREAM_TIMEOUT_S * UPSTREAM_TRIES)
    except asyncio.IncompleteReadError as exc:
        raise OSError("the upstream closed the TCP connection mid-answer") from exc


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

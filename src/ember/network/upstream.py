"""The sandbox resolver's questions to the upstream resolver, asked from the host.

The upstream is the policy's ``dns_upstream`` or the host's
``/etc/resolv.conf``; it is asked in a query of the resolver's own (a fresh
ID from a fresh port), never the guest's, over UDP and then over TCP if that
answer came back truncated.  Every exchange is bounded in time: a silent
upstream costs the guest a SERVFAIL, never a stuck query.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
from pathlib import Path
from typing import Any

from ember.errors import ConfigError
from ember.network import dns
from ember.network.policy import parse_upstream

RESOLV_CONF = "/etc/resolv.conf"
MAX_TTL_S = 86400  # longer TTLs are cut to this, in the answer the guest gets too
UPSTREAM_TIMEOUT_S = 2.0
UPSTREAM_TRIES = 2  # over UDP; then SERVFAIL (the guest's stub asks again on its own)


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


async def ask_upstream(upstream: tuple[str, int], name: str, qtype: int) -> dns.Answer:
    """The upstream's answer: over UDP, over TCP if that came back truncated."""
    ident = secrets.randbelow(1 << 16)
    query = dns.build_query(ident, name, qtype, dns.CLASS_IN)
    data = b""
    for _ in range(UPSTREAM_TRIES):
        try:
            data = await _udp_exchange(upstream, query, ident)
            break
        except TimeoutError:
            continue
    else:
        raise TimeoutError(f"no answer in {UPSTREAM_TRIES} tries")
    answer = dns.parse_answer(data, ident, name, qtype, dns.CLASS_IN, max_ttl=MAX_TTL_S)
    if answer.truncated:
        data = await _tcp_exchange(upstream, query)
        answer = dns.parse_answer(data, ident, name, qtype, dns.CLASS_IN, max_ttl=MAX_TTL_S)
    return answer


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

"""A DNS server for tests, written apart from ember.network.dns so that each checks the other.

It answers A queries from a table (with a CNAME and compression pointers,
as real servers do), NOERROR without records for other types of a known
name, NXDOMAIN for the rest, and remembers every name it was asked.
A name starting with ``big`` gets enough records to need TCP.

In-process: ``FakeUpstream(records).start()``.  As a script (for a test
host's namespace): ``python fake_dns.py ADDR PORT NAME=A1,A2@TTL ...``; it
prints ``ready`` and serves until its stdin closes.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import sys
import threading
from dataclasses import dataclass, field

# name -> (addresses, ttl); "alias.NAME" answers a CNAME to NAME, then NAME's addresses.
Records = dict[str, tuple[list[str], int]]


def _question(query: bytes) -> tuple[str, int, int]:
    labels, offset = [], 12
    while query[offset]:
        length = query[offset]
        labels.append(query[offset + 1 : offset + 1 + length].decode().lower())
        offset += 1 + length
    qtype, _ = struct.unpack_from("!HH", query, offset + 1)
    return ".".join(labels), qtype, offset + 5


def _name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def answer(records: Records, query: bytes) -> bytes:
    name, qtype, end = _question(query)
    ident, flags = struct.unpack_from("!HH", query)
    canonical = name.removeprefix("alias.")
    known = canonical in records or name.startswith("big")
    rrs: list[bytes] = []
    owner = b"\xc0\x0c"  # the question's name
    if known and qtype == 1:
        if canonical != name:
            target = _name(canonical)
            # the target's offset: header, question, this record's fixed part
            rrs.append(owner + struct.pack("!HHIH", 5, 1, 300, len(target)) + target)
            owner = struct.pack("!H", 0xC000 | (end + 12))
        addresses, ttl = records.get(canonical, ([], 60))
        if name.startswith("big"):
            addresses = [f"10.99.{i // 250}.{i % 250 + 1}" for i in range(60)]
        for address in addresses:
            rrs.append(owner + struct.pack("!HHIH", 1, 1, ttl, 4) + socket.inet_aton(address))
    rcode = 0 if known else 3
    header = struct.pack("!HHHHHH", ident, 0x8180 | (flags & 0x0100) | rcode, 1, len(rrs), 0, 0)
    return header + query[12:end] + b"".join(rrs)


@dataclass
class FakeUpstream:
    records: Records
    host: str = "127.0.0.1"
    asked: list[tuple[str, int, str]] = field(default_factory=list)  # name, type, udp/tcp
    silent: bool = False  # never answer (a dead upstream)
    _servers: list[socketserver.UDPServer | socketserver.TCPServer] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        port: int = self._servers[0].server_address[1]
        return self.host, port

    def start(self, port: int = 0) -> FakeUpstream:
        upstream = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                name, qtype, _ = _question(data)
                upstream.asked.append((name, qtype, "udp"))
                if upstream.silent:
                    return
                reply = answer(upstream.records, data)
                if len(reply) > 512:  # truncated: header and question, TC set
                    _, _, end = _question(data)
                    reply = reply[:2] + bytes([reply[2] | 0x02]) + reply[3:6] + bytes(6)
                    reply = reply + data[12:end]
                sock.sendto(reply, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                (length,) = struct.unpack("!H", self.rfile.read(2))
                data = self.rfile.read(length)
                name, qtype, _ = _question(data)
                upstream.asked.append((name, qtype, "tcp"))
                reply = answer(upstream.records, data)
                self.wfile.write(struct.pack("!H", len(reply)) + reply)

        udp = socketserver.ThreadingUDPServer((self.host, port), Udp)
        tcp = socketserver.ThreadingTCPServer((self.host, udp.server_address[1]), Tcp)
        for server in (udp, tcp):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
            self._servers.append(server)
        return self

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


def main(argv: list[str]) -> None:
    host, port, *specs = argv
    records: Records = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        addresses, _, ttl = rest.partition("@")
        records[name] = (addresses.split(","), int(ttl or 60))
    FakeUpstream(records, host).start(int(port))
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main(sys.argv[1:])

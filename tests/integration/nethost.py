"""A test's own "remote" host: a network namespace joined to the host by a veth pair,
running a small TCP server that answers every connection with the peer's address, and
optionally a DNS server (tests/unit/fake_dns.py) answering names from a table.

Never an address outside this machine: 10.254.N.0/24 lives on a veth the test made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

FAKE_DNS = Path(__file__).resolve().parents[1] / "unit" / "fake_dns.py"

# Serves each port in a thread, answering every connection with one line made from GREETING
# (a format string over ``peer`` and ``port``). The guest's servers use it too.
SERVE = r"""
import socket, threading
def _serve_ports(greeting, ports):
    def serve(listener, port):
        while True:
            conn, peer = listener.accept()
            with conn:
                conn.sendall((greeting.format(peer=peer[0], port=port) + "\n").encode())
    for port in ports:
        listener = socket.create_server(("0.0.0.0", port), backlog=64)
        threading.Thread(target=serve, args=(listener, port), daemon=True).start()
"""

# Installed in a sandbox's code worker: the first line a server sends, or the error's name.
PROBE = """
import socket
import time
def _probe(host, port):
    try:
        with socket.create_connection((host, port), timeout=15) as s:
            return s.makefile().readline().strip()
    except OSError as exc:
        return type(exc).__name__
"""

# A server inside the guest answering like the test hosts do.
GUEST_PORT = 8000
GUEST_SERVER = SERVE + f'_serve_ports("guest hello {{peer}}", [{GUEST_PORT}])\n'

SERVER = (
    SERVE
    + r"""
import sys
_serve_ports("hello {peer} on {port}", map(int, sys.argv[1:]))
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""
)


@dataclass
class RemoteHost:
    index: int
    ports: tuple[int, ...]
    dns: dict[str, str] | None = None  # name -> address, served on port 53 if given
    server: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    dns_server: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"embtest-{os.getpid()}-{self.index}"

    @property
    def veth(self) -> str:
        return f"etst{os.getpid() % 100000}x{self.index}"

    @property
    def address(self) -> str:
        return f"10.254.{self.index}.2"

    @property
    def subnet(self) -> str:
        return f"10.254.{self.index}.0/24"

    def start(self) -> RemoteHost:
        sh(f"ip netns add {self.name}")
        sh(f"ip link add {self.veth} type veth peer name eth0 netns {self.name}")
        sh(f"ip addr add 10.254.{self.index}.1/24 dev {self.veth}")
        sh(f"ip link set {self.veth} up")
        sh(f"ip -n {self.name} link set lo up")
        sh(f"ip -n {self.name} addr add {self.address}/24 dev eth0")
        sh(f"ip -n {self.name} link set eth0 up")
        sh(f"ip -n {self.name} route add default via 10.254.{self.index}.1")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", SERVER, *map(str, self.ports)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.server.stdout is not None
        assert self.server.stdout.readline() == b"ready\n"
        if self.dns is not None:
            records = [f"{name}={address}@300" for name, address in self.dns.items()]
            self.dns_server = subprocess.Popen(
                ["ip", "netns", "exec", self.name, sys.executable, str(FAKE_DNS),
                 self.address, "53", *records],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )  # fmt: skip
            assert self.dns_server.stdout is not None
            assert self.dns_server.stdout.readline() == b"ready\n"
        return self

    def close(self) -> None:
        for server in (self.server, self.dns_server):
            if server is not None:
                server.kill()
                server.wait()
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)
        subprocess.run(["ip", "link", "delete", self.veth], check=False, capture_output=True)


def sh(command: str) -> None:
    subprocess.run(command.split(), check=True, capture_output=True)

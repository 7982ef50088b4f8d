"""``sb.listen(port)``: guest-initiated vsock connections to a host application (issue 14, 15).

The jailed VMM runs as a uid of its own; the listening socket is given to that uid with mode
0600, so the VMM can connect and no other host user can.
"""

from __future__ import annotations

import os
import threading

import pytest

from ember import ConfigError, Sandbox
from ember.protocol import CHANNEL_PORT, READY_PORT

from .conftest import Images

GUEST_SENDS = """
import socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.connect((2, {port}))
s.sendall(b"hello from the guest")
reply = s.recv(64)
s.close()
reply
"""


def test_the_guest_reaches_a_host_listener_only_the_vmm_can_use(images: Images) -> None:
    with Sandbox() as sb:
        listener = sb.listen(5005)
        with listener:
            path = f"{sb._vmm.uds}_5005"
            st = os.stat(path)
            assert st.st_mode & 0o777 == 0o600
            assert st.st_uid == sb._vmm.dir.stat().st_uid  # the VMM's own uid when jailed
            listener.settimeout(120)
            got: list[bytes] = []

            def serve() -> None:
                conn, _ = listener.accept()
                with conn:
                    got.append(conn.recv(64))
                    conn.sendall(b"hello from the host")

            server = threading.Thread(target=serve)
            server.start()
            result = sb.run_code(GUEST_SENDS.format(port=5005), timeout=120)
            server.join(120)
            assert result.error is None, result.error
            assert got == [b"hello from the guest"]
            assert result.value == "b'hello from the host'"
            with pytest.raises(ConfigError, match="already listens"):
                sb.listen(5005)  # one listener per port
        again = sb.listen(5005)  # the first one was closed: the port is free again
        again.close()


def test_ember_ports_and_bad_ports_are_refused(images: Images) -> None:
    with Sandbox() as sb:
        for port in (READY_PORT, CHANNEL_PORT, 0, 2**32):
            with pytest.raises(ConfigError):
                sb.listen(port)
        assert sb.run_code("6*7").value == "42"

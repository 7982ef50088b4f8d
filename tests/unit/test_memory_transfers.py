"""Files and exec output through the shared region without KVM: the real agent and host ends.

A memfd laid out like the VMM's region stands in for the shared memory: the agent's
handlers (in a real :class:`AgentServer` on a Unix socket) see it as their mapped
region, the host's :class:`AgentClient` leases its slots. The slots here are small
(256 KiB), so a file of 1.5 MiB wraps each ring many times and both ends wait for room. The
doorbells are plain memory (no ioeventfd): a sleeping host finds records on its look.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import mmap
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import ring
from ember.agent import common, filering, shm
from ember.agent.server import AgentServer
from ember.client import AgentClient, AsyncAgentClient, HostRegion
from ember.errors import AgentFileNotFoundError, OutputTooLarge, ProtocolError, SandboxTimeout

SLOTS = 4  # two for channels and files, two for run_code
SLOT_SIZE = 256 << 10
SIZE = ring.region_size(SLOTS, SLOT_SIZE)


class Rig:
    def __init__(self, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.memfd = os.memfd_create("test-file-ring", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, SIZE + ring.PAGE)
        self.map = mmap.mmap(self.memfd, SIZE + ring.PAGE)
        header = memoryview(self.map)[: ring.PAGE].cast("Q")
        header[ring.H_VERSION] = ring.VERSION
        header[ring.H_GENERATION] = 777
        header[ring.H_SLOT_COUNT] = SLOTS
        header[ring.H_SLOT_SIZE] = SLOT_SIZE
        header[ring.H_MAGIC] = ring.MAGIC
        header.release()
        monkeypatch.setattr(shm, "_region", shm.Region(os.dup(self.memfd), SIZE, 0))
        self.path = str(base / "agent.sock")
        self.connects = 0
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        self.server = AgentServer(listener)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        bells = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(SLOTS)]
        self.region = HostRegion(os.dup(self.memfd), bells, SIZE, SLOT_SIZE, code=True)
        self.client = AgentClient(self.connect, shm=lambda: self.region)
        self.ring = self.client.files._ring
        assert self.ring is not None

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        self.connects += 1
        return sock

    def async_client(self) -> AsyncAgentClient:
        """An asyncio client on this agent; its ring transfers connect through ``connect``."""
        return AsyncAgentClient(
            lambda: asyncio.open_unix_connection(self.path),
            shm=lambda: self.region,
            ring_connect=self.connect,
        )

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.thread.join(10)
        self.region.close()


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    made = Rig(tmp_path, monkeypatch)
    try:
        yield made
    finally:
        made.close()


def test_a_file_many_rings_long_goes_through_memory_both_ways(rig: Rig, tmp_path: Path) -> None:
    data = os.urandom(3 << 19) + b"tail"  # 6 rings of this size, ends mid-record
    target = tmp_path / "deep" / "dir" / "blob.bin"
    assert rig.client.files.write(target, data, mode=0o640) == len(data)
    assert target.read_bytes() == data and (target.stat().st_mode & 0o777) == 0o640
    assert rig.client.files.read(target, max_output=None) == data
    out = io.BytesIO()
    assert rig.client.files.read_into(target, out) == len(data)
    assert hashlib.sha256(out.getvalue()).digest() == hashlib.sha256(data).digest()
    assert rig.ring.transfers == 3 and rig.region.leases == 3
    assert not [p for p in target.parent.iterdir() if p.name != "blob.bin"]  # no temp left


def test_a_big_file_is_read_through_a_mapping_and_what_it_gains_meanwhile_too(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent copies a big regular file out of a read-only mapping (user-space copies,
    not the guest kernel's), then reads on to the end as before; small files, and files that
    say they are empty (/proc), are read with readinto."""
    data = os.urandom(filering.MAP_READ_MIN * 3 + 5)  # past one ring: several records
    target = tmp_path / "big.bin"
    target.write_bytes(data)
    mapped: list[int] = []
    real = filering._MappedSource.__init__

    def spy(self: filering._MappedSource, view: memoryview) -> None:
        mapped.append(view.nbytes)
        with target.open("ab") as f:  # grows after the agent's fstat and mapping
            f.write(b"grown")
        real(self, view)

    monkeypatch.setattr(filering._MappedSource, "__init__", spy)
    assert rig.client.files.read(target, max_output=None) == data + b"grown"
    assert mapped == [len(data)]
    small = tmp_path / "small.bin"
    small.write_bytes(data[: filering.MAP_READ_MIN - 1])
    assert rig.client.files.read(small, max_output=None) == data[: filering.MAP_READ_MIN - 1]
    assert rig.client.files.read("/proc/self/status", max_output=None).startswith(b"Name:")
    assert mapped == [len(data)]  # neither was mapped


def test_a_stream_source_an_append_and_an_empty_file(rig: Rig, tmp_path: Path) -> None:
    target = tmp_path / "log"
    rig.client.files.write(target, io.BytesIO(b"a" * 100_000))
    rig.client.files.write(target, b"b" * 10, append=True)
    assert target.read_bytes() == b"a" * 100_000 + b"b" * 10
    assert rig.client.files.write(tmp_path / "empty", b"") == 0
    assert (tmp_path / "empty").read_bytes() == b""
    # the small bytes (append, empty) went with their REQUEST over vsock, not a slot: only
    # the stream took one
    assert rig.ring.transfers == 1
    assert rig.client.files.read(tmp_path / "empty") == b""  # reads take a slot, small or not
    assert rig.client.files.read_into(tmp_path / "empty", io.BytesIO()) == 0
    assert rig.ring.transfers == 3


def test_guest_errors_arrive_as_they_do_over_vsock(rig: Rig, tmp_path: Path) -> None:
    with pytest.raises(AgentFileNotFoundError):  # through a slot, given back
        rig.client.files.read(tmp_path / "missing")
    assert rig.region.leases == 1
    with pytest.raises(AgentFileNotFoundError):
        rig.client.files.read_into(tmp_path / "missing", io.BytesIO())
    keep = tmp_path / "keep"
    keep.write_bytes(b"old")
    (tmp_path / "adir").mkdir()
    with pytest.raises(Exception, match="IsADirectoryError"):
        rig.client.files.write(tmp_path / "adir", os.urandom(200_000))
    big = tmp_path / "big"
    big.write_bytes(b"x" * 600_000)
    with pytest.raises(OutputTooLarge):
        rig.client.files.read(big, max_output=100_000)
    out = io.BytesIO()
    assert rig.client.files.read_into(keep, out) == 3  # the slot came back after each failure
    assert out.getvalue() == b"old"
    assert rig.region.leases == 5 and rig.ring.transfers == 1


def test_no_free_slot_or_an_agent_without_the_ops_means_vsock(rig: Rig, tmp_path: Path) -> None:
    held = [rig.region.lease(0), rig.region.lease(0)]  # both data slots are busy
    assert all(held) and rig.region.lease(0) is None
    target = tmp_path / "f"
    assert rig.client.files.write(target, b"over vsock") == 10
    assert rig.client.files.read(target) == b"over vsock"
    assert rig.ring.transfers == 0
    for lease in held:
        assert lease is not None
        rig.region.release(lease)
    for op in ("file_ring_write", "file_ring_read"):  # an agent from before the file rings
        del rig.server._ops[op]
    big = b"still vsock" * 10_000  # past INLINE_WRITE_MAX: a ring is tried first
    assert rig.client.files.write(target, big) == len(big)
    assert rig.ring.supported is False and rig.ring.transfers == 0
    assert rig.client.files.read(target) == big
    # Bytes go into the ring before the agent answers; declined, they all go over vsock,
    # also when the ring filled up before the answer came.
    rig.ring.supported = True
    huge = os.urandom(3 * SLOT_SIZE)
    assert rig.client.files.write(target, huge) == len(huge)
    assert target.read_bytes() == huge and rig.ring.supported is False
    assert rig.ring.transfers == 0


def _quiet_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file past file_get's size, within one ring, from an agent that never sleeps (so
    the host sends no wake-up bytes: the transfers may keep their connections)."""
    monkeypatch.setattr(filering, "SPIN_S", 30.0)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(100_000))
    return source


def test_a_transfer_that_woke_no_one_rides_and_keeps_the_kept_connection(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _quiet_source(tmp_path, monkeypatch)
    assert rig.client.ping()["pong"] and rig.connects == 1
    assert rig.client.files.read(source) == source.read_bytes()
    out = io.BytesIO()
    assert rig.client.files.read_into(source, out) == 100_000
    data = os.urandom(100_000)  # past INLINE_WRITE_MAX: through a slot
    assert rig.client.files.write(tmp_path / "up", data) == len(data)
    assert (tmp_path / "up").read_bytes() == data
    assert rig.ring.transfers == 3
    # every request rode the first connection, and none left a byte on it for the next
    assert rig.client.ping()["pong"] and rig.connects == 1


def test_a_connection_that_carried_a_wake_up_or_an_unkept_answer_is_closed(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source"
    source.write_bytes(os.urandom(100_000))
    rig.client.ping()
    # The host believes the guest waits for room after every record: it sends a wake-up
    # byte each time that the agent, which never waited, leaves unread on the connection.
    with monkeypatch.context() as patched:
        patched.setattr(ring.RingReader, "producer_waiting", lambda self: True)
        assert rig.client.files.read(source) == source.read_bytes()
    assert rig.client.ping()["pong"] and rig.connects == 2  # not the byte-laden one
    # An agent from before this change does not say it keeps the connection.
    monkeypatch.setattr(common, "KEPT_STREAM_OPS", frozenset({"exec", "file_write"}))
    assert rig.client.files.read(source) == source.read_bytes()
    assert rig.client.ping()["pong"] and rig.connects == 3
    assert rig.ring.transfers == 2


def test_a_guest_that_breaks_the_ring_fails_the_read_not_the_host(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer (the guest) publishes a head no ring of this size can have."""
    from ember.agent import filering

    def vandal(conn: socket.socket, req: dict[str, object]) -> None:
        slot = filering.Slot(req)  # type: ignore[arg-type]
        slot.ctl[ring.HEAD] = (1 << 40) + 8
        conn.recv(1)  # hold the connection until the host gives up

    rig.server._ops["file_ring_read"] = vandal
    with pytest.raises(ProtocolError, match="broke its ring"):
        rig.client.files.read_into(tmp_path, io.BytesIO())  # streams: straight to a slot
    rig.server._ops["file_ring_read"] = filering.handle_file_ring_read
    (tmp_path / "ok").write_bytes(b"fine")
    out = io.BytesIO()
    assert rig.client.files.read_into(tmp_path / "ok", out) == 4  # the slot is usable again
    assert out.getvalue() == b"fine" and rig.ring.transfers == 1


def test_the_async_client_moves_files_through_the_ring_too(rig: Rig, tmp_path: Path) -> None:

    async def main() -> tuple[int, bytes]:
        client = rig.async_client()
        try:
            size = await client.files.write(tmp_path / "a.bin", data)
            return size, await client.files.read(tmp_path / "a.bin", max_output=None)
        finally:
            await client.close()

    data = os.urandom(700_000)
    assert asyncio.run(main()) == (len(data), data)
    assert rig.region.leases == 2  # both went through a leased slot


def test_the_async_clients_ring_transfers_keep_a_connection_of_their_own(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its kept connections are asyncio streams; the ring's transfers run in a worker thread
    # on blocking sockets, so they keep theirs apart: one connection for all of them.

    source = _quiet_source(tmp_path, monkeypatch)

    async def main() -> tuple[int, int]:
        client = rig.async_client()
        try:
            for _ in range(3):
                assert await client.files.read(source) == source.read_bytes()
                data = os.urandom(100_000)  # past INLINE_WRITE_MAX: through a slot
                assert await client.files.write(tmp_path / "up", data) == len(data)
                assert (tmp_path / "up").read_bytes() == data
            kept = len(client._ring_kept)
        finally:
            await client.close()
        return kept, len(client._ring_kept)

    assert asyncio.run(main()) == (1, 0)  # kept until the client closed
    assert rig.connects == 1 and rig.region.leases == 6


def test_a_wake_byte_to_a_guest_that_already_answered_and_left_is_no_error() -> None:
    """The guest may take the last record and close between the host's store and its
    wake byte; the transfer's outcome is in the answer, not in that send."""
    from ember.client.shm import nudge

    ours, theirs = socket.socketpair()
    theirs.close()
    nudge(ours)  # EPIPE: ignored
    nudge(ours)
    ours.close()


# --- exec output through a leased slot (ember.agent.execute, ember.client.output_ring) ---

BIG_OUTPUT = (
    "import sys\n"
    "for i in range(40):\n"
    "    sys.stdout.buffer.write(bytes([65 + i % 26]) * 20000)\n"
    "    sys.stdout.flush()\n"
    "    sys.stderr.write(f'e{i}')\n"
    "    sys.stderr.flush()\n"
)


def test_exec_output_crosses_the_ring_in_order_per_stream(rig: Rig) -> None:
    with rig.client.exec_stream([sys.executable, "-c", BIG_OUTPUT], timeout=60) as stream:
        out, err = bytearray(), bytearray()
        for chunk in stream:
            (out if chunk.stream == "stdout" else err).extend(chunk.data)
        assert stream._output is not None and stream._output.records >= 13  # 64 KiB reads
    assert stream.result is not None and stream.result.exit_code == 0
    assert bytes(out) == b"".join(bytes([65 + i % 26]) * 20000 for i in range(40))
    assert err.decode() == "".join(f"e{i}" for i in range(40))
    assert rig.region.leases == 1
    assert len(rig.region._free) == 2  # the slot came back


def test_exec_with_stdin_limits_and_timeouts_keep_their_rules(rig: Rig) -> None:
    data = os.urandom(600_000)
    result = rig.client.exec(["cat"], stdin=data, timeout=60, max_output=None)
    assert (result.exit_code, result.stdout) == (0, data)
    with pytest.raises(OutputTooLarge):
        rig.client.exec(["head", "-c", "500000", "/dev/zero"], timeout=60, max_output=100_000)
    with pytest.raises(SandboxTimeout) as timed_out:
        rig.client.exec(["sh", "-c", "echo started; sleep 30"], timeout=0.5)
    assert timed_out.value.result is not None and timed_out.value.result.stdout == b"started\n"
    assert rig.region.leases == 3 and len(rig.region._free) == 2


def test_an_exec_stream_dropped_unclosed_gives_its_slot_back(rig: Rig) -> None:
    stream = rig.client.exec_stream(["sh", "-c", "echo up; exec sleep 30"], timeout=60)
    assert next(stream).data == b"up\n"
    assert len(rig.region._free) == 1  # leased while it lives
    del stream
    gc.collect()
    assert len(rig.region._free) == 2  # dropped: the slot is back, and the command hung up
    result = rig.client.exec(["echo", "next"], timeout=60)
    assert result.stdout == b"next\n" and rig.region.leases == 2  # through the ring again


def test_an_agent_that_ignores_the_slot_still_streams_frames(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ember.agent import execute

    monkeypatch.setattr(execute, "leased_slot", lambda req: None)  # as an older agent does
    with rig.client.exec_stream(["sh", "-c", "echo out; echo err >&2"], timeout=60) as stream:
        chunks = [(c.stream, c.data) for c in stream]
        assert stream._output is not None and stream._output.records == 0
    assert sorted(chunks) == [("stderr", b"err\n"), ("stdout", b"out\n")]


def unknown_stream_vandal(conn: socket.socket, req: dict[str, object]) -> None:
    """An exec op that writes an output record naming no stream into its leased slot."""
    from ember.agent import filering

    slot = filering.Slot(req)  # type: ignore[arg-type]
    writer = ring.RingWriter(slot.ctl, slot.data, slot.bell, lambda: None)
    writer.send(memoryview(b"\x09not a stream"))
    conn.recv(1)  # hold the connection until the host gives up


def test_an_output_record_of_no_known_stream_is_a_protocol_error(rig: Rig) -> None:
    rig.server._ops["exec"] = unknown_stream_vandal
    with pytest.raises(ProtocolError, match="no known stream"):
        rig.client.exec(["true"], timeout=30)
    assert len(rig.region._free) == 2

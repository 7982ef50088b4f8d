"""Memory channels end to end (issue 16): guest code -> shared region ring -> SDK.

A sandbox restored from the default template: the run_code worker mapped the region
through /dev/mem in the template, the VMM gave this restore a fresh memfd and header,
and ``ember.agent.channel`` leases a ring from the host. Each test checks that the ring
really carried the bytes (the channel says so, and the host counted the lease), that
every message arrived whole and in order, and what happens at the edges: a fork gets a
region of its own, a host without a free ring makes the guest use vsock, and a guest
that panics mid-stream ends the stream with an error after the frames that arrived.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from ember.errors import ProtocolError, SandboxError
from ember.sandbox import Sandbox

from .conftest import Images

SEND = """
from ember.agent import channel
import hashlib
sizes = {sizes!r}
with channel({name!r}) as ch:
    memory = ch.uses_memory
    for i, size in enumerate(sizes):
        ch.send(hashlib.sha256(str(i).encode()).digest() * (size // 32) + bytes(size % 32))
memory
"""


def expected(sizes: list[int]) -> list[bytes]:
    return [
        hashlib.sha256(str(i).encode()).digest() * (s // 32) + bytes(s % 32)
        for i, s in enumerate(sizes)
    ]


def send_and_receive(sb: Sandbox, name: str, sizes: list[int]) -> tuple[str | None, list[bytes]]:
    """Run the sender in the worker while the host reads the channel; (its value, frames)."""
    values: list[str | None] = []
    errors: list[str] = []

    def run() -> None:
        result = sb.run_code(SEND.format(sizes=sizes, name=name), timeout=600)
        if result.error is not None:
            errors.append(f"{result.error.type}: {result.error.message}")
        values.append(result.value)

    runner = threading.Thread(target=run)
    runner.start()
    frames = list(sb.channel(name, timeout=600))
    runner.join()
    assert not errors, errors
    return values[0], frames


@pytest.fixture(scope="module")
def sb(images: Images) -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


def test_messages_of_every_size_go_through_the_ring_whole_and_in_order(sb: Sandbox) -> None:
    sizes = [0, 1, 31, 4096, 65536, 3 << 20, 7, 1 << 20] + [100] * 500
    before = sb._channels.ring_leases
    uses_memory, frames = send_and_receive(sb, "sizes", sizes)
    assert uses_memory == "True"
    assert sb._channels.ring_leases == before + 1
    assert [len(f) for f in frames] == sizes
    assert frames == expected(sizes)


def test_more_than_a_ring_of_data_waits_for_the_host_and_loses_nothing(sb: Sandbox) -> None:
    sizes = [1 << 20] * 40  # 40 MiB through an 8 MiB ring: the producer must wait for room
    uses_memory, frames = send_and_receive(sb, "bulk", sizes)
    assert uses_memory == "True"
    assert frames == expected(sizes)


def test_a_new_guest_process_maps_its_slot_itself(sb: Sandbox) -> None:
    """Not the template's worker: a process that maps only its slot, on first use."""
    program = (
        "from ember.agent import channel\n"
        "with channel('exec') as ch:\n"
        "    ch.send(b'from a new process' * 1000)\n"
        "    print(ch.uses_memory)\n"
    )
    result = sb.exec(["python3", "-c", program], timeout=600)
    assert (result.exit_code, result.stdout) == (0, b"True\n"), result
    assert list(sb.channel("exec", timeout=60)) == [b"from a new process" * 1000]


def test_a_host_without_a_free_ring_makes_the_guest_use_vsock(images: Images) -> None:
    with Sandbox() as sandbox:
        sandbox._channels._shm_factory = lambda: None  # as if the VMM had no region
        uses_memory, frames = send_and_receive(sandbox, "fallback", [10, 20000, 5])
        assert uses_memory == "False"
        assert sandbox._channels.ring_leases == 0
        assert frames == expected([10, 20000, 5])


def test_a_fork_gets_a_region_of_its_own(sb: Sandbox) -> None:
    generation = "from ember.agent import shm\nshm.region().generation"
    parent = sb.run_code(generation, timeout=300).value
    with sb.fork() as child:
        assert child.run_code(generation, timeout=300).value not in (None, parent)
        # Both stream at once through their own regions, each receiving only its own.
        results: dict[str, list[bytes]] = {}

        def one(box: Sandbox, name: str) -> None:
            results[name] = send_and_receive(box, name, [50000] * 20)[1]

        threads = [
            threading.Thread(target=one, args=(box, name))
            for box, name in ((sb, "parent"), (child, "child"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {"parent": expected([50000] * 20), "child": expected([50000] * 20)}


def test_a_guest_panic_mid_stream_ends_the_stream_after_what_arrived(images: Images) -> None:
    code = (
        "from ember.agent import channel\n"
        "ch = channel('doomed')\n"
        "for i in range(50):\n"
        "    ch.send(i.to_bytes(4, 'little') * 1024)\n"
        "open('/proc/sysrq-trigger', 'w').write('c')\n"
    )
    with Sandbox() as doomed:
        threading.Thread(target=lambda: _swallow(doomed, code), daemon=True).start()
        frames: list[bytes] = []
        with pytest.raises(ProtocolError):
            for frame in doomed.channel("doomed", timeout=600):
                frames.append(frame)
        # Published before the panic, so still in the SDK's mapping of the region: all arrive.
        assert frames == [i.to_bytes(4, "little") * 1024 for i in range(50)]
        assert doomed._channels.ring_leases == 1


def _swallow(sb: Sandbox, code: str) -> None:
    """The call ends with the VM: crashed, or closed under it when the test leaves first."""
    try:
        sb.run_code(code, timeout=600)
    except SandboxError:  # SandboxCrashed, or "this sandbox is closed"
        pass


def test_files_cross_a_ring_both_ways_and_arrive_whole(sb: Sandbox) -> None:
    """sb.files through a leased slot: the agent writes the file straight from the ring
    and reads it straight into one; what lands in the guest is checked in the guest."""
    data = hashlib.sha256(b"seed").digest() * (3 << 15) + b"odd tail"  # 3 MiB and a bit
    ring = sb._client.files._ring
    assert ring is not None
    before = ring.transfers
    assert sb.files.write("/tmp/ring/blob.bin", data, mode=0o600) == len(data)
    digest = sb.run_code(
        "import hashlib, os\n"
        "p = '/tmp/ring/blob.bin'\n"
        "(hashlib.sha256(open(p, 'rb').read()).hexdigest(), oct(os.stat(p).st_mode & 0o777))",
        timeout=300,
    ).value
    assert digest == repr((hashlib.sha256(data).hexdigest(), "0o600"))
    assert sb.files.read("/tmp/ring/blob.bin", max_output=None) == data
    assert ring.transfers == before + 2
    with pytest.raises(FileNotFoundError):
        sb.files.read("/tmp/ring/missing")
    sb.files.remove("/tmp/ring", recursive=True)


def test_reads_ride_a_kept_connection_through_a_slot_or_come_whole_without_one(
    sb: Sandbox,
) -> None:
    """Every read crosses a slot on the kept connection, small or not (a small file then
    costs what one short exchange does); with no slot free, a file up to FILE_GET_MAX comes
    whole in one short exchange (``file_get``) and a larger one over vsock."""
    from ember.protocol import FILE_GET_MAX

    client = sb._client
    ring = client.files._ring
    assert ring is not None
    small = {"/tmp/get/a.txt": b"", "/tmp/get/b.txt": b"hi\n", "/tmp/get/c": b"q" * FILE_GET_MAX}
    for path, data in small.items():
        sb.files.write(path, data)
    larger = bytes(range(256)) * (FILE_GET_MAX // 256 + 1)
    sb.files.write("/tmp/get/larger", larger)
    connects: list[int] = []
    for owner in (client, ring):
        original = owner._connect
        owner._connect = lambda original=original: connects.append(1) or original()
    sb.ping()  # the kept connection every read below rides
    connects.clear()
    before = ring.transfers
    for path, data in small.items():
        assert sb.files.read(path) == data
    assert sb.files.read("/proc/self/status").startswith(b"Name:")  # size unknown to stat
    assert sb.files.read("/tmp/get/larger") == larger
    assert ring.transfers == before + len(small) + 2 and not connects
    with pytest.raises(FileNotFoundError):
        sb.files.read("/tmp/get/missing")
    with pytest.raises(IsADirectoryError):
        sb.files.read("/tmp/get")
    region = client._shm() if client._shm is not None else None
    assert region is not None
    held = []
    while (lease := region.lease(0)) is not None:  # every data slot taken
        held.append(lease)
    try:
        before = ring.transfers
        for path, data in small.items():
            assert sb.files.read(path) == data
        assert sb.files.read("/tmp/get/larger") == larger
        assert ring.transfers == before and client._session.file_get  # the agent knows the op
    finally:
        for lease in held:
            region.release(lease)
    sb.files.remove("/tmp/get", recursive=True)


def test_exec_output_crosses_a_ring_and_arrives_whole(sb: Sandbox) -> None:
    """The agent reads the command's pipes straight into a leased slot; the host sees the
    same output, streams and result as over vsock."""
    region = sb._region()
    assert region is not None
    before = region.leases
    script = "head -c 3000000 /dev/zero | tr '\\0' 'z'; echo done >&2; exit 7"
    result = sb.exec(["sh", "-c", script], timeout=300, max_output=None)
    assert region.leases == before + 1  # the exec's output went through a slot
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"z" * 3_000_000, b"done\n")
    chunks = list(sb.exec_stream(["sh", "-c", "echo a; echo b >&2"], timeout=300))
    assert sorted((c.stream, c.data) for c in chunks) == [("stderr", b"b\n"), ("stdout", b"a\n")]
    echoed = sb.exec(["cat"], stdin=b"through stdin and back" * 1000, timeout=300)
    assert echoed.stdout == b"through stdin and back" * 1000
    assert region.leases == before + 3

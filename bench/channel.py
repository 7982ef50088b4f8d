"""Data channels guest -> host: the shared-memory ring against vsock and a host socket pair.

Usage: ``.venv/bin/python bench/channel.py [--runs 3] [--mib 64] [--seconds 2]
[--files-mib 10] [--only-files] [--json]``

Three transports carry the same messages from ``ember.agent.channel`` to
``Sandbox.channel`` (DESIGN.md §6: peers in the same run, medians and ratios):

- ``ring``: a restored sandbox whose channel leases a ring in the VMM's shared region
  (issue 16); the bytes never cross the guest kernel;
- ``vsock``: the same in a sandbox whose host side declines rings, so the channel is
  today's vsock stream (each 1 MiB frame through the emulated guest kernel);
- ``unix``: the channel code on the host over a Unix socket pair: the floor for a
  socket-based channel with no VM at all.

Figures: throughput of ``--mib`` MiB in 1 MiB messages (from the first message's
arrival to the last, so the channel's opening is not counted), and the cost per
small message (2,000 x 64 B). Then the seed's scenario: the guest sends 64 KiB and
1 MiB frames at 60 Hz for ``--seconds`` and panics half-way, while a host loop ticks at
60 Hz; counted: late ticks (a tick that does not yet have the previous tick's frame)
and lost frames while the guest lived, and the host loop's worst lateness, which must
stay small after the panic too (the host never blocks on a dead guest). Then
``sb.files`` writing and reading ``--files-mib`` MiB, and ``exec(["cat", file])``
showing it, through rings and over vsock, next to the guest's own tmpfs write and read
(the target is 1.1x of it) and a host tmpfs file. Nothing is asserted: this prints tables.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from _common import fmt_num, format_table, to_json

from ember import Sandbox
from ember.client import ChannelServer
from ember.errors import SandboxCrashed

MIB = 1 << 20

GUEST_BULK = """
from ember.agent import channel
payload = bytearray({size})
with channel({name!r}) as ch:
    ch.send(b"go")
    for i in range({count}):
        ch.send(payload)
ch.uses_memory
"""

GUEST_FRAMES = """
import time
from ember.agent import channel
frame = bytearray({size})
ch = channel({name!r})
start = time.monotonic()
for i in range({count}):
    if i == {panic_at}:
        open('/proc/sysrq-trigger', 'w').write('c')
    frame[:8] = i.to_bytes(8, 'little')
    ch.send(frame)
    delay = start + (i + 1) / 60 - time.monotonic()
    if delay > 0:
        time.sleep(delay)
"""


def receive_timed(messages: Iterator[bytes]) -> tuple[float, int, int]:
    """(seconds from the first message to the last, messages after the first, bytes)."""
    first: float | None = None
    count = size = 0
    last = 0.0
    for message in messages:
        now = time.perf_counter()
        if first is None:
            first = now
            continue
        count += 1
        size += len(message)
        last = now
    return (last - (first or last)), count, size


def in_guest(sb: Sandbox, code: str) -> threading.Thread:
    def run() -> None:
        try:
            result = sb.run_code(code, timeout=1200)
            if result.error is not None:
                print(f"guest error: {result.error.type}: {result.error.message}", file=sys.stderr)
        except SandboxCrashed:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def sandbox(transport: str) -> Sandbox:
    sb = Sandbox()
    if transport == "vsock":
        sb._channels._shm_factory = None  # the host declines rings: today's vsock channel
    return sb


class UnixPeer:
    """The channel code on the host, over a Unix socket: the floor."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory()
        path = os.path.join(self._dir.name, "ch.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(8)
        self.server = ChannelServer(listener)
        self.path = path

    def send(self, name: str, size: int, count: int) -> threading.Thread:
        os.environ["EMBER_CHANNEL_UNIX"] = self.path
        from ember.agent.channels import channel

        def run() -> None:
            payload = bytearray(size)
            with channel(name) as ch:
                ch.send(b"go")
                for _ in range(count):
                    ch.send(payload)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.server.close()
        self._dir.cleanup()


def bulk(
    transport: str, size: int, count: int, runs: int, peer: UnixPeer | None, sb: Sandbox | None
) -> list[tuple[float, int]]:
    out = []
    for run in range(runs):
        name = f"bulk{size}-{run}"
        if transport == "unix":
            assert peer is not None
            thread = peer.send(name, size, count)
            seconds, got, nbytes = receive_timed(peer.server.channel(name, timeout=600))
        else:
            assert sb is not None
            thread = in_guest(sb, GUEST_BULK.format(size=size, name=name, count=count))
            seconds, got, nbytes = receive_timed(sb.channel(name, timeout=1200))
        thread.join()
        if got != count:
            raise SystemExit(f"{transport}: {got} of {count} messages arrived")
        out.append((seconds, nbytes))
    return out


def frames_scenario(transport: str, size: int, seconds: float) -> dict[str, Any]:
    """60 Hz frames, a panic half-way, a 60 Hz host loop: late ticks, lost frames."""
    count = round(seconds * 60)
    panic_at = count // 2
    arrived: list[int] = []
    ended = threading.Event()
    with sandbox(transport) as sb:
        in_guest(sb, GUEST_FRAMES.format(size=size, name="frames", count=count, panic_at=panic_at))

        def consume() -> None:
            try:
                for frame in sb.channel("frames", timeout=1200):
                    arrived.append(int.from_bytes(frame[:8], "little"))
            except Exception:
                pass
            ended.set()

        threading.Thread(target=consume, daemon=True).start()
        while not arrived and not ended.is_set():
            time.sleep(0.001)
        start = time.perf_counter()
        late = 0
        worst = 0.0
        tick = 0
        after_end = 0
        while after_end < 60:  # keep ticking a second past the stream's end
            tick += 1
            due = start + tick / 60
            time.sleep(max(0.0, due - time.perf_counter()))
            worst = max(worst, time.perf_counter() - due)
            if ended.is_set():
                after_end += 1
            elif tick <= panic_at and len(arrived) < min(tick, panic_at):
                late += 1
    lost = panic_at - len([i for i in arrived if i < panic_at])
    return {
        "late_ticks": late,
        "lost_frames": lost,
        "received": len(arrived),
        "sent_before_panic": panic_at,
        "worst_tick_lateness_ms": worst * 1000,
    }


FLOOR = """
import sys
ns = {}
for line in sys.stdin:
    sys.stdout.write(repr(eval(line, ns)) + "\\n")
    sys.stdout.flush()
"""


def run_code_round_trips(runs: int) -> dict[str, float]:
    """p50 ms of ``run_code('x * 7')``: code ring (worker polling), vsock (the agent's
    socketpair to the worker), the ring after the worker fell asleep (one vsock wake-up),
    and the floor: a host Python subprocess answering over pipes (no VM at all)."""
    from ember.agent.codering import SPIN_MAX_S
    from ember.client import AgentClient

    out: dict[str, list[float]] = {"ring": [], "vsock": [], "ring after sleep": [], "host": []}
    with Sandbox() as sb:
        sb.run_code("x = 6", timeout=300)
        vsock = AgentClient(sb._connect)
        try:
            for name, call in (("vsock", vsock.run_code), ("ring", sb.run_code)):
                call("x * 7", timeout=300)  # not interleaved: a vsock call's packets keep
                time.sleep(0.2)  # the guest kernel busy for a while after its answer
                for _ in range(runs):
                    t0 = time.perf_counter()
                    call("x * 7", timeout=300)
                    out[name].append(time.perf_counter() - t0)
            for _ in range(min(runs, 3)):
                time.sleep(SPIN_MAX_S + 0.3)
                t0 = time.perf_counter()
                sb.run_code("x * 7", timeout=300)
                out["ring after sleep"].append(time.perf_counter() - t0)
        finally:
            vsock.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOR],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert proc.stdin is not None and proc.stdout is not None
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        proc.stdin.write("6 * 7\n")
        proc.stdout.readline()
        out["host"].append(time.perf_counter() - t0)
    proc.stdin.close()
    proc.wait()
    return {name: statistics.median(v) * 1000 for name, v in out.items()}


GUEST_OWN_FILE = """
import time
buf = bytearray({size})
buf[::4096] = b"x" * len(buf[::4096])  # the buffer's pages exist before the clock starts
t0 = time.perf_counter()
with open({path!r}, "wb") as f:
    f.write(buf)
t1 = time.perf_counter()
with open({path!r}, "rb", buffering=0) as f:
    f.readinto(buf)
t2 = time.perf_counter()
import os
os.unlink({path!r})
del buf
(t1 - t0, t2 - t1)
"""


def files_each_way(mib: int, runs: int) -> dict[str, dict[str, float]]:
    """Median seconds to write and read ``mib`` MiB: ``sb.files`` through the ring and
    through vsock, the guest's own write and read of its tmpfs (the target: within
    1.1x), and a host tmpfs file (the floor). Each write makes a new file, as a user's does."""
    from ember.client import AgentClient

    size = mib * MIB
    data = os.urandom(size)
    out: dict[str, dict[str, list[float]]] = {
        name: {"write": [], "read": [], "exec cat": []}
        for name in ("ring", "vsock", "guest itself", "host")
    }
    with Sandbox() as sb:
        vsock = AgentClient(sb._connect)  # no region: today's DATA and STDOUT frames
        try:
            for run in range(runs):
                for name, client in (("ring", sb._client), ("vsock", vsock)):
                    path = f"/tmp/bench-{name}-{run}"
                    t0 = time.perf_counter()
                    client.files.write(path, data)
                    t1 = time.perf_counter()
                    back = client.files.read(path, max_output=None)
                    t2 = time.perf_counter()
                    assert back == data, f"{name} read back different bytes"
                    shown = client.exec(["cat", path], timeout=600, max_output=None).stdout
                    t3 = time.perf_counter()
                    assert shown == data, f"{name} exec output differs"
                    client.files.remove(path)
                    out[name]["write"].append(t1 - t0)
                    out[name]["read"].append(t2 - t1)
                    out[name]["exec cat"].append(t3 - t2)
                code = GUEST_OWN_FILE.format(size=size, path=f"/tmp/bench-own-{run}")
                value = sb.run_code(code, timeout=600).value
                assert value is not None, "the guest's own file timing failed"
                wrote, read = (float(x) for x in value.strip("()").split(","))
                out["guest itself"]["write"].append(wrote)
                out["guest itself"]["read"].append(read)
                out["guest itself"]["exec cat"].append(read)  # cat's read of it, at best
        finally:
            vsock.close()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        for run in range(runs):
            path = os.path.join(tmp, f"f{run}")
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                f.write(data)
            t1 = time.perf_counter()
            with open(path, "rb") as f:
                f.read()
            t2 = time.perf_counter()
            subprocess.run(["cat", path], stdout=subprocess.PIPE, check=True)
            out["host"]["write"].append(t1 - t0)
            out["host"]["read"].append(t2 - t1)
            out["host"]["exec cat"].append(time.perf_counter() - t2)
    return {
        name: {way: statistics.median(v) for way, v in ways.items()} for name, ways in out.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64, help="bulk MiB per run (vsock: /8)")
    parser.add_argument("--seconds", type=float, default=2.0, help="60 Hz scenario length")
    parser.add_argument(
        "--files-mib", type=int, default=10, help="MiB per sb.files write and read (0: skip)"
    )
    parser.add_argument("--only-files", action="store_true", help="just the file transfers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"bulk_mb_s": {}, "small_us": {}, "frames": {}}
    if args.files_mib:
        results["files_mib"] = args.files_mib
        results["files_s"] = files_each_way(args.files_mib, 1 if args.only_files else args.runs)
    if args.only_files:
        if args.json:
            print(to_json(results))
        elif "files_s" in results:
            print_files(results["files_s"], args.files_mib)
        return 0
    peer = UnixPeer()
    try:
        for transport in ("ring", "vsock", "unix"):
            sb = None if transport == "unix" else sandbox(transport)
            try:
                mib = max(1, args.mib // 8) if transport == "vsock" else args.mib
                runs = bulk(transport, MIB, mib, args.runs, peer, sb)
                results["bulk_mb_s"][transport] = statistics.median(
                    nbytes / s / 1e6 for s, nbytes in runs
                )
                small = bulk(transport, 64, 2000, args.runs, peer, sb)
                results["small_us"][transport] = statistics.median(s / 2000 * 1e6 for s, _ in small)
            finally:
                if sb is not None:
                    sb.close()
        for transport in ("ring", "vsock"):
            for size in (64 << 10, MIB):
                results["frames"][f"{transport} {size >> 10} KiB"] = frames_scenario(
                    transport, size, args.seconds
                )
        results["run_code_ms"] = run_code_round_trips(max(args.runs, 9))
    finally:
        peer.close()
    if args.json:
        print(to_json(results))
        return 0
    print_tables(results)
    return 0


def print_files(files: dict[str, dict[str, float]], mib: int) -> None:
    own = files["guest itself"]
    print(
        format_table(
            [
                f"{mib} MiB",
                "files.write s",
                "files.read s",
                "exec cat s",
                "write / guest's own",
                "read / guest's own",
            ],
            [
                [
                    name,
                    fmt_num(t["write"], 2),
                    fmt_num(t["read"], 2),
                    fmt_num(t["exec cat"], 2),
                    ratio(t["write"], own["write"]),
                    ratio(t["read"], own["read"]),
                ]
                for name, t in files.items()
            ],
        )
    )


def print_tables(results: dict[str, Any]) -> None:
    bulk_mb, small = results["bulk_mb_s"], results["small_us"]
    rows = []
    for name, fmt in (
        ("throughput 1 MiB messages (MB/s)", bulk_mb),
        ("per 64 B message (us)", small),
    ):
        rows.append(
            [
                name,
                fmt_num(fmt["ring"], 1),
                fmt_num(fmt["vsock"], 1),
                fmt_num(fmt["unix"], 1),
                ratio(fmt["ring"], fmt["vsock"]),
                ratio(fmt["ring"], fmt["unix"]),
            ]
        )
    print(
        format_table(
            ["guest -> host channel", "ring", "vsock", "host unix", "ring/vsock", "ring/unix"], rows
        )
    )
    print()
    frame_rows = [
        [
            name,
            str(r["late_ticks"]),
            str(r["lost_frames"]),
            f"{r['received']}/{r['sent_before_panic']}",
            fmt_num(r["worst_tick_lateness_ms"], 1),
        ]
        for name, r in results["frames"].items()
    ]
    print(
        format_table(
            [
                "60 Hz frames, panic half-way",
                "late ticks",
                "lost frames",
                "received/sent",
                "worst tick late (ms)",
            ],
            frame_rows,
        )
    )
    print()
    if "files_s" in results:
        print_files(results["files_s"], results["files_mib"])
        print()
    code = results["run_code_ms"]
    print(
        format_table(
            ["run_code('x * 7') round trip", "p50 ms", "/host"],
            [[name, fmt_num(ms, 2), ratio(ms, code["host"])] for name, ms in code.items()],
        )
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


if __name__ == "__main__":
    sys.exit(main())

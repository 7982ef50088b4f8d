"""virtio-net: TCP throughput guest -> host and request latency, Ember against QEMU microvm.

Usage: ``.venv/bin/python bench/net.py [--runs 3] [--mib 16] [--rounds 200] [--only ember|qemu]
[--no-sandbox] [--json]`` (as root: namespaces and TAPs).

Every run gets a fresh sandbox network from Ember's own host side (:mod:`ember.network.host`:
a namespace with ``tap0``, a veth to the host, nftables), and a VMM boots the same kernel,
initramfs and root file system on that TAP with the same guest address, MAC and command line:

- ember: ``ember boot --tap tap0 --netns ...`` (virtio-net in the Python VMM);
- qemu: ``qemu-system-x86_64 -M microvm ... -netdev tap,ifname=tap0,vhost=off
  -device virtio-net-device`` started inside the namespace (``ip netns exec``), so QEMU's
  virtio-net also runs in user space, as Ember's does;
- ember sandbox (unless ``--no-sandbox``): the same script in a ``Sandbox(network=...)``
  restored from the networked template, i.e. what an SDK user gets; its time to ready is
  printed next to a plain ``Sandbox()``'s, which shows what the host-side network costs.

The guest script (python3) measures in the guest: the TCP connect time, the median round trip
of ``--rounds`` 64-byte request/response exchanges on one connection (an echo server on the
host), and the rate of sending ``--mib`` MiB to a sink on the host (until the sink has read the
last byte and answered). It prints one ``EMBER-NET`` line. The host servers listen on the
sandbox's host-side veth address; the policy allows the sandbox address pool.

On this host the guest kernel is emulated (HOST.md), so both VMMs are bound by the guest's
network stack and the figures are the host's: only the ratio means something. Runs alternate
which VMM goes first. Times are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _common import fmt_num, fmt_ratio, format_table, run_measured, summarize, to_json
from boot import CMDLINE, ember_cmd_words, ember_env, qemu_base_argv, qemu_cmdline

from ember.images import artifact_path
from ember.network.host import GATEWAY_IP, GUEST_CIDR, TAP_NAME, SandboxNetwork
from ember.network.policy import NetworkPolicy
from ember.vmm.config import DEFAULT_MAC

MARKER = b"EMBER-NET"
POLICY = NetworkPolicy(["10.253.0.0/16"])  # the host side of every sandbox network
FIGURES = ("mbit_s", "rtt_ms", "connect_ms")
LINE = re.compile(r"EMBER-NET mbit_s=(?P<mbit_s>[\d.]+) rtt_ms=(?P<rtt_ms>[\d.]+) "
                  r"connect_ms=(?P<connect_ms>[\d.]+)")  # fmt: skip

GUEST_SCRIPT = """
import socket, time
host, sink, echo, mib, rounds = {host!r}, {sink}, {echo}, {mib}, {rounds}
t = time.monotonic()
s = socket.create_connection((host, echo), timeout=60)
connect_ms = (time.monotonic() - t) * 1e3
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(rounds):
    t = time.monotonic()
    s.sendall(b"x" * 64)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
    rtts.append((time.monotonic() - t) * 1e3)
s.close()
chunk = bytes(65536)
s = socket.create_connection((host, sink), timeout=60)
t = time.monotonic()
for _ in range(mib * 16):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
assert s.recv(1) == b"k"
seconds = time.monotonic() - t
rtts.sort()
print(f"EMBER-NET mbit_s={{mib * 8 * 1048576 / seconds / 1e6:.2f}} "
      f"rtt_ms={{rtts[len(rtts) // 2]:.3f}} connect_ms={{connect_ms:.3f}}", flush=True)
"""


class HostServers:
    """A sink (reads to EOF, answers b"k") and an echo server on one address, in threads."""

    def __init__(self, address: str) -> None:
        self.sink = socket.create_server((address, 0))
        self.echo = socket.create_server((address, 0))
        for listener, serve in ((self.sink, _sink), (self.echo, _echo)):
            threading.Thread(target=_accept_loop, args=(listener, serve), daemon=True).start()

    def ports(self) -> tuple[int, int]:
        return self.sink.getsockname()[1], self.echo.getsockname()[1]

    def close(self) -> None:
        for listener in (self.sink, self.echo):
            # shutdown wakes the accept() blocked in the thread; close alone would not
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()


def _accept_loop(listener: socket.socket, serve: Any) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _sink(conn: socket.socket) -> None:
    with conn:
        while conn.recv(1 << 20):
            pass
        conn.sendall(b"k")


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def guest_script(host: str, ports: tuple[int, int], mib: int, rounds: int) -> str:
    return GUEST_SCRIPT.format(host=host, sink=ports[0], echo=ports[1], mib=mib, rounds=rounds)


def boot_argv(vmm: str, net: SandboxNetwork, script: str, mem_mib: int) -> list[str]:
    kernel, initrd, rootfs = (str(artifact_path(k)) for k in ("kernel", "initrd", "rootfs"))
    workload = ["python3", "-c", script]
    if vmm == "ember":
        return [
            sys.executable, "-m", "ember.cli.main", "boot", "--kernel", kernel, "--initrd", initrd,
            "--rootfs", rootfs, "--mem", str(mem_mib), "--cmdline", CMDLINE,
            "--tap", TAP_NAME, "--netns", net.netns_path, "--guest-ip", GUEST_CIDR,
            "--gateway", GATEWAY_IP, "--", *workload,
        ]  # fmt: skip
    words = f"{ember_cmd_words(workload)} ember.net={GUEST_CIDR},{GATEWAY_IP}"
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    return [
        "ip", "netns", "exec", net.netns,  # execs QEMU: the measured process is QEMU
        *qemu_base_argv(mem_mib, Path(kernel), Path(initrd), qemu),
        "-drive", f"id=root,file={rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-netdev", f"tap,id=n0,ifname={TAP_NAME},script=no,downscript=no,vhost=off",
        "-device", f"virtio-net-device,netdev=n0,mac={DEFAULT_MAC}",
        "-append", f"{qemu_cmdline(CMDLINE)} {words}",
    ]  # fmt: skip


def parse(text: str) -> dict[str, float] | None:
    match = LINE.search(text)
    return None if match is None else {k: float(v) for k, v in match.groupdict().items()}


def one_boot(vmm: str, args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        net = SandboxNetwork.create(POLICY)
        stack.callback(net.close)
        servers = HostServers(net.host_ip)
        stack.callback(servers.close)
        script = guest_script(net.host_ip, servers.ports(), args.mib, args.rounds)
        run = run_measured(
            boot_argv(vmm, net, script, args.mem),
            timeout_s=args.timeout,
            marker=MARKER,
            env=ember_env(),
        )
        figures = parse(run.tail.decode("utf-8", "replace")) if run.marker_s else None
        if figures is None:
            print(f"bench/net.py: {vmm} run failed: {run.error}", file=sys.stderr)
            return {}
        return {**figures, "peak_rss_mib": run.peak_rss_mib}


def one_sandbox(args: argparse.Namespace) -> dict[str, Any]:
    from ember.sandbox import Sandbox

    started = time.monotonic()
    with Sandbox():
        plain_ready_ms = (time.monotonic() - started) * 1e3
    started = time.monotonic()
    with Sandbox(network=POLICY) as sb:
        ready_ms = (time.monotonic() - started) * 1e3
        network = sb._vmm.network
        assert network is not None
        servers = HostServers(network.host_ip)
        try:
            script = guest_script(network.host_ip, servers.ports(), args.mib, args.rounds)
            result = sb.exec(["python3", "-c", script], timeout=args.timeout)
        finally:
            servers.close()
        figures = parse(result.stdout.decode())
        if figures is None:
            print(f"bench/net.py: sandbox run failed: {result.stderr[-2000:]!r}", file=sys.stderr)
            return {}
        return {**figures, "ready_ms": ready_ms, "plain_ready_ms": plain_ready_ms}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="virtio-net throughput and latency vs QEMU")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=16, help="MiB sent guest -> host per run")
    parser.add_argument("--rounds", type=int, default=200, help="request/response round trips")
    parser.add_argument("--mem", type=int, default=256, metavar="MiB")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--only", choices=("ember", "qemu"))
    parser.add_argument("--no-sandbox", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/net.py: needs root (network namespaces, TAPs, nftables)", file=sys.stderr)
        return 2
    vmms = [args.only] if args.only else ["ember", "qemu"]
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in vmms}
    if not args.no_sandbox:
        samples["ember sandbox"] = []
    for i in range(args.runs):
        order = vmms if i % 2 == 0 else list(reversed(vmms))
        for vmm in order:
            samples[vmm].append(one_boot(vmm, args))
        if not args.no_sandbox:
            samples["ember sandbox"].append(one_sandbox(args))
    report: dict[str, Any] = {"runs": args.runs, "mib": args.mib, "rounds": args.rounds}
    for name, runs in samples.items():
        report[name] = {}
        for key in (*FIGURES, "peak_rss_mib", "ready_ms", "plain_ready_ms"):
            summary = summarize([run.get(key) for run in runs])
            report[name][key] = summary.as_dict() if summary else None
    ratios = {}
    if "ember" in report and "qemu" in report:
        for key in FIGURES:
            ember, qemu = report["ember"][key], report["qemu"][key]
            ratios[key] = ember["p50"] / qemu["p50"] if ember and qemu and qemu["p50"] else None
    report["ratio_ember_over_qemu"] = ratios
    if args.json:
        print(to_json(report))
        return 0
    rows = []
    for name in samples:
        cells = [report[name][key] for key in (*FIGURES, "peak_rss_mib")]
        ok = max((c["n"] for c in cells if c), default=0)
        rows.append([name, *(fmt_num(c["p50"]) if c else "-" for c in cells), f"{ok}/{args.runs}"])
    if ratios:
        rows.append(["ember/qemu", *(fmt_ratio(ratios[k]) for k in FIGURES), "", ""])
    headers = ["VMM", "TCP Mbit/s p50", "RTT ms p50", "connect ms p50", "peak RSS MiB", "ok"]
    print(f"{args.mib} MiB guest -> host, {args.rounds} x 64-byte round trips, medians:")
    print(format_table(headers, rows))
    sandbox = report.get("ember sandbox", {})
    if sandbox.get("ready_ms") and sandbox.get("plain_ready_ms"):
        print(
            f"Sandbox() ready p50: {sandbox['plain_ready_ms']['p50']:.1f} ms without a network, "
            f"{sandbox['ready_ms']['p50']:.1f} ms with one (namespace, veth, TAP, nftables)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

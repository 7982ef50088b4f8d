"""Where each millisecond of one ``Sandbox()`` goes (issue 17, item 1), from the syscalls.

Usage: ``.venv/bin/python bench/timeline.py [--runs 5]``

With the zygote warm, ``strace -f -ttt`` is attached to the zygote and to the child it forked
ahead of the next request (``ember.zygote_fork``: that child becomes this ``Sandbox()``'s
VMM), and one ``Sandbox()`` is made. The landmark system calls of that VMM and its threads
(the request read, cgroup join, what it still makes of the VM, the jail's unshare/chroot,
seccomp, the vsock listen, the first KVM_RUN) are printed as milliseconds since the host asked
for the sandbox; what the child made while it waited (state, memory, VM, vCPUs:
``ember.vmm.vm_shell``) happened before and is not in the request's path. The zygote's own
fork of the *next* child ahead is left out. strace slows every traced call (tens of
microseconds each), so the phases' shares, not their absolute sum, are the result; the
untraced ``Sandbox()`` median is printed beside it as the peer.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ember import Sandbox
from ember.zygote import Zygote
from ember.zygote_fork import AHEAD_NAME

TRACE = "clone,clone3,fork,read,openat,write,ioctl,mmap,unshare,setns,chroot,pivot_root,seccomp,prctl,bind,listen,setresuid,exit_group"  # noqa: E501
LANDMARKS: tuple[tuple[str, str], ...] = (
    (r"^read\(", "request read"),
    (r"cgroup.procs", "cgroup join"),
    (r"O_RDONLY.*snapshot|state", "state file open"),
    (r"KVM_CREATE_VM", "KVM_CREATE_VM"),
    (r"KVM_SET_USER_MEMORY_REGION", "memslot"),
    (r"KVM_CREATE_VCPU", "vCPU created"),
    (r"KVM_SET_SREGS|KVM_SET_REGS", "vCPU state set"),
    (r"KVM_SET_IRQCHIP", "irqchip state set"),
    (r"KVM_SET_PIT2", "PIT state set"),
    (r"KVM_SET_CLOCK", "clock set"),
    (r"unshare\(", "jail: unshare"),
    (r"chroot\(|pivot_root\(", "jail: chroot"),
    (r"setresuid\(", "jail: uid"),
    (r"seccomp\(|PR_SET_SECCOMP", "seccomp load"),
    (r"listen\(", "vsock listening"),
    (r"KVM_RUN", "first KVM_RUN"),
)


def waiting_child(zygote_pid: int, timeout: float = 10.0) -> int:
    """The zygote's child forked ahead (comm ``ember-ahead``): the next request's VMM."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{zygote_pid}/task/{zygote_pid}/children").read_text().split()
        for pid in children:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == AHEAD_NAME:
                    return int(pid)
            except OSError:
                continue
        time.sleep(0.01)
    raise SystemExit("the zygote has no child forked ahead")


def trace_one(
    zygote_pid: int, workdir: Path, template: str | None
) -> tuple[float, list[tuple[float, str, str]]]:
    out = workdir / "trace"
    ahead = waiting_child(zygote_pid)
    strace = subprocess.Popen(["strace", "-f", "-ttt", "-qq", "-e", f"trace={TRACE}",
                               "-o", str(out), "-p", str(zygote_pid), "-p", str(ahead)],
                              stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(1.0)  # attached
    t0 = time.time()
    sb = Sandbox(template=template)
    ready = time.time()
    sb.ping()
    pinged = time.time()
    time.sleep(0.3)
    strace.terminate()
    strace.wait()
    sb.close()
    seen: dict[str, tuple[float, str]] = {}
    ours = {ahead}  # the VMM and the threads it starts
    for line in out.read_text().splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or not parts[0].isdigit() or int(parts[0]) not in ours:
            continue
        try:
            stamp = float(parts[1])
        except ValueError:
            continue
        if stamp < t0:
            continue
        if started := re.match(r"clone3?\(.*\) = (\d+)$", parts[2]):
            ours.add(int(started.group(1)))
        for pattern, name in LANDMARKS:
            if name not in seen and re.search(pattern, parts[2]):
                seen[name] = (stamp, parts[2][:90])
    events = sorted(((s - t0) * 1000, n, text) for n, (s, text) in seen.items())
    events.append(((ready - t0) * 1000, "Sandbox() returned", ""))
    events.append(((pinged - t0) * 1000, "ping answered", ""))
    return (ready - t0) * 1000, sorted(events)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--template", default=None, help="restore this template (default: the default)"
    )
    args = parser.parse_args(argv)
    Sandbox(template=args.template).close()
    plain = []
    for _ in range(args.runs):
        started = time.perf_counter()
        sb = Sandbox(template=args.template)
        plain.append((time.perf_counter() - started) * 1000)
        sb.close()
    zygote_pid = Zygote.get()._proc.pid
    with tempfile.TemporaryDirectory(prefix="ember-timeline-") as workdir:
        traced, events = trace_one(zygote_pid, Path(workdir), args.template)
    print(f"untraced Sandbox() p50 {statistics.median(plain):.1f} ms over {args.runs}; "
          f"traced {traced:.1f} ms")  # fmt: skip
    for at, name, text in events:
        print(f"{at:8.1f} ms  {name:22s} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

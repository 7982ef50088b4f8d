"""Where each MiB of one idle restored VMM process goes (issue 17, item 1).

Usage: ``.venv/bin/python bench/vmm_memory.py [--pings 20] [--json]``

Restores one default sandbox and reads its VMM's ``/proc/PID/smaps`` three times: right after
``Sandbox()`` returns, after its first ping, and after ``--pings`` more requests and a few idle
seconds (parked). Each mapping is put in a family (Python heap, anonymous arenas, thread
stacks, the interpreter and its shared objects, guest RAM, the kvm_run pages, ...) and the
private pages of each family are summed, so a cut can be aimed at the family that holds them.
The peer, measured in the same run: a plain ``python3 -c 'import time; time.sleep(60)'``
process (what any Python process costs), whose USS is the floor a forked Python VMM starts from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import format_table

from ember import Sandbox

THREAD_STACK_KIB = 256  # what ember.zygote gives a VMM's threads, if it sets a size
FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty")


def family(name: str, perms: str, size_kib: int) -> str:
    """The family of one mapping, from its pathname (the 6th smaps header column), and for an
    anonymous one from its size: pymalloc arenas are 1 MiB, a thread's stack is 8 MiB (the
    default RLIMIT_STACK) or what ``threading.stack_size`` asked for, glibc's per-thread malloc
    arenas reserve 64 MiB (often split into a used and a PROT_NONE part)."""
    if name == "[heap]":
        return "brk heap (malloc)"
    if name == "[stack]":
        return "main stack"
    if name.startswith("[stack:") or name == "[anon:stack]":
        return "thread stacks"
    if name in ("[vdso]", "[vvar]", "[vsyscall]"):
        return "vdso/vvar"
    if "anon_inode:kvm-vcpu" in name:
        return "kvm_run (vCPU mmap)"
    if name.startswith("anon_inode:") or name.startswith("/dev/kvm"):
        return "kvm other"
    if "memory" in name and ("/templates/" in name or "ember" in name) and not name.endswith(".so"):
        return "guest RAM (template file, MAP_PRIVATE)"
    if name.startswith("/memfd:") or name.startswith("/dev/shm"):
        return "memfd/shm (guest RAM or shared region)"
    if ".so" in name:
        return "shared objects (.so)"
    if "python" in name:
        return "python binary"
    if name == "":
        if size_kib == 1024:
            return "anon: pymalloc arenas (1 MiB)"
        if perms.startswith("---"):
            return "anon: guard / reserved (PROT_NONE)"
        if size_kib in (8192, 8196) or (
            size_kib <= 8192 and size_kib % 256 == 0 and size_kib >= 256
        ):
            return "anon: thread stacks"
        if size_kib >= 60 * 1024 or size_kib % 1024 == 132:
            return "anon: glibc malloc arenas"
        return "anon: other (mmap'd buffers)"
    return f"other: {name[:60]}"


def read_smaps(pid: int) -> dict[str, dict[str, int]]:
    """KiB per family and field."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            name = head[5].strip() if len(head) > 5 else ""
            start, end = (int(x, 16) for x in head[0].split("-"))
            current = family(name, head[1], (end - start) // 1024)
            continue
        key = head[0].rstrip(":") if head else ""
        if key in FIELDS:
            out[current][key] += int(head[1])
    return dict(out)


def rollup(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            values[parts[0].rstrip(":")] = int(parts[1])
    return values


def uss_kib(r: dict[str, int]) -> int:
    return r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def snapshot(pid: int) -> dict[str, Any]:
    r = rollup(pid)
    return {"rollup_kib": r, "uss_kib": uss_kib(r), "families": read_smaps(pid),
            "threads": threads(pid)}  # fmt: skip


def measure(pings: int, template: str | None) -> dict[str, Any]:
    Sandbox(template=template).close()  # the zygote warm, the template cached
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.5)
    stages: dict[str, Any] = {}
    with Sandbox(template=template) as sb:
        pid = sb._vmm.vmm_pid
        assert pid is not None
        stages["after restore"] = snapshot(pid)
        sb.ping()
        stages["after first ping"] = snapshot(pid)
        for _ in range(pings):
            sb.ping()
        sb.run_code("6*7")
        time.sleep(3.0)  # idle: parked
        stages[f"after {pings} pings + run_code, 3 s idle"] = snapshot(pid)
        status = sb._vmm.control("status")
    peer_r = rollup(peer.pid)
    peer.kill()
    peer.wait()
    gc_state = {"frozen": status.get("gc_frozen"), "collections": status.get("gc_collections")}
    return {"stages": stages, "peer_python_uss_kib": uss_kib(peer_r), "gc": gc_state}


def render(report: dict[str, Any]) -> str:
    stages = report["stages"]
    names = list(stages)
    final = stages[names[-1]]["families"]
    fams = sorted({f for s in stages.values() for f in s["families"]},
                  key=lambda f: -final.get(f, {}).get("Private_Dirty", 0))  # fmt: skip
    rows = []
    for fam in fams:
        row = [fam]
        for name in names:
            v = stages[name]["families"].get(fam, dict.fromkeys(FIELDS, 0))
            row.append(f"{v['Private_Dirty']} / {v['Private_Clean']} / {v['Rss']}")
        rows.append(row)
    rows.append(["USS total (KiB)", *(str(stages[n]["uss_kib"]) for n in names)])
    rows.append(["threads", *(str(stages[n]["threads"]) for n in names)])
    lines = [format_table(["family: private dirty / private clean / rss (KiB)", *names], rows)]
    peer = report["peer_python_uss_kib"]
    last = stages[names[-1]]["uss_kib"]
    lines.append(f"VMM gc: {report['gc']}")
    lines.append(f"peer: idle python3 process USS {peer} KiB; VMM / peer: {last / peer:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pings", type=int, default=20)
    parser.add_argument(
        "--template", default=None, help="restore this template (default: the default)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = measure(args.pings, args.template)
    print(json.dumps(report, indent=1, default=str) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

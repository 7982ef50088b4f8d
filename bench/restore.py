"""Sandboxes restored from a template: latency, throughput, memory and density.

Usage: ``.venv/bin/python bench/restore.py [--runs 20] [--live 1000] [--parallel 2] [--json]
[--age-hours H]``

Ember (through the SDK, the zygote warm, the default template cached):
- ``ready``: ``Sandbox()`` returns (VMM forked, VM restored, its vsock socket listening);
- ``ping``: ``Sandbox()`` then the agent's answer to a ping;
- ``run_code``: ``Sandbox()`` then ``run_code('6*7')`` answered by the warm worker;
- ``lifecycle``: ``Sandbox()`` → ``exec(["true"])`` → ``close()``;
- the same from a spare (``keep_warm(1)``: restored and warmed ahead, waiting 1 s);
- a live sandbox's ``ping`` and ``run_code`` 0, 1 and 3 s after its last call (an interactive
  caller's latency: a kept connection, a worker that stopped polling);
- the guest's wall clock minus the host's, read in ``run_code`` (``agent/tscclock.py``);
- creations per second with N threads creating, pinging and closing sandboxes;
- the private memory (USS) of an idle sandbox's VMM process;
- how many sandboxes live at once, each answering a ping, with ≥ 2 GiB of host memory free.

Peers in the same run: QEMU's microvm restoring the same guest (same kernel, initrd, root
file system, RAM) from a migration file (``-incoming "exec:cat FILE"``) until QMP reports it
running — QEMU has no vsock here (no /dev/vhost-vsock), so its figure stops at "running", which
is what Ember's ``ready`` is; and ``subprocess.run(["true"])``, the floor for any new process.
Medians and p90s are printed; nothing is asserted.

A template's age matters on hosts where the guest clock is the host's TSC (kvm_pvm): the restored
guest sees its clock jump by the age. The report names the template and its age. ``--age-hours
H`` measures a template that really is that old: the bench keeps one (``bench-aged``, a snapshot
of a default sandbox) and, if it is younger than H, waits until it is not. Nothing is faked:
the age is the host time since the snapshot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import fmt_num, format_table, spare_after, to_json
from boot import CMDLINE, default_artifact, ember_cmd_words, qemu_base_argv, qemu_cmdline

from ember import Sandbox, templates
from ember.spec import DEFAULT_MEM_MIB

MIN_FREE_GIB = 2.0
QEMU_MARKER = b"EMBER-BENCH-WORKLOAD-UP"


def quantiles(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"p50": None, "p90": None, "n": 0}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p90": p90, "n": len(ordered)}


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def uss_mib(pid: int) -> float | None:
    """Private (unshared) memory of a process, from smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kib = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Private_"))
    return kib / 1024


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


# --- Ember -------------------------------------------------------------------------------------


AGED_TEMPLATE = "bench-aged"


def template_age_hours(name: str | None) -> float:
    meta = templates.find(name or templates.DEFAULT).meta
    return (time.time() - float(meta.get("created", time.time()))) / 3600


def aged_template(hours: float) -> str:
    """``bench-aged``, made now if missing, once it is at least ``hours`` old."""
    try:
        age = template_age_hours(AGED_TEMPLATE)
    except Exception:  # missing or unreadable: make it
        with Sandbox() as sb:
            sb.snapshot(AGED_TEMPLATE)
        age = template_age_hours(AGED_TEMPLATE)
    if age < hours:
        wait = (hours - age) * 3600
        print(
            f"bench: template {AGED_TEMPLATE} is {age * 60:.1f} min old; waiting "
            f"{wait / 60:.1f} min for it to be {hours * 60:.1f} min old",
            file=sys.stderr,
        )
        time.sleep(wait)
    return AGED_TEMPLATE


def measure_ember(runs: int, template: str | None = None) -> dict[str, Any]:
    Sandbox(template=template).close()  # warm the zygote (and build the template if missing)
    age_h = template_age_hours(template)
    ready: list[float] = []
    ping: list[float] = []
    code: list[float] = []
    life: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        sb = Sandbox(template=template)
        ready.append((time.perf_counter() - started) * 1000)
        sb.ping()
        ping.append((time.perf_counter() - started) * 1000)
        sb.close()
        started = time.perf_counter()
        with Sandbox(template=template) as sb:
            value = sb.run_code("6*7").value
            code.append((time.perf_counter() - started) * 1000)
        assert value == "42", value

        def lifecycle() -> None:
            with Sandbox(template=template) as box:
                assert box.exec(["true"]).exit_code == 0

        life.append(timed(lifecycle))
    return {
        "template": template or templates.DEFAULT,
        "template_age_h": age_h,
        # pages each restore copies before its guest runs (ember.snapshot.prefault); 0: none
        "prefault_pages": int(
            templates.find(template or templates.DEFAULT).meta.get("prefault_pages", 0)
        ),
        "ready_ms": quantiles(ready),
        "ping_ms": quantiles(ping),
        "run_code_ms": quantiles(code),
        "lifecycle_ms": quantiles(life),
    }


def measure_throughput(parallel: int, seconds: float) -> dict[str, Any]:
    done: list[int] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def worker() -> None:
        count = 0
        while time.monotonic() < stop:
            try:
                with Sandbox() as sb:
                    sb.ping()
                count += 1
            except Exception as exc:
                errors.append(repr(exc))
        done.append(count)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return {"parallel": parallel, "per_s": sum(done) / elapsed, "errors": errors[:3]}


def measure_density(target: int, idle_s: float) -> dict[str, Any]:
    """Create sandboxes until ``target`` or the host's free memory nears the floor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    live: list[Sandbox] = []
    stopped_by = "target"
    free_before = mem_available_gib()
    try:
        while len(live) < target:
            if mem_available_gib() < MIN_FREE_GIB + 0.5:
                stopped_by = "memory"
                break
            try:
                live.append(Sandbox())
            except Exception as exc:
                stopped_by = f"error: {exc!r}"[:200]
                break
            if len(live) % 100 == 0:
                print(f"  {len(live)} live, {mem_available_gib():.1f} GiB free", file=sys.stderr)
        time.sleep(idle_s)  # let them settle and park
        uss = [u for u in (uss_mib(sb._vmm.proc.pid) for sb in live if sb._vmm.proc) if u]
        answered = ping_all(live)
        free_after = mem_available_gib()
    finally:
        closers = [threading.Thread(target=close_all, args=(live[i::4],)) for i in range(4)]
        for t in closers:
            t.start()
        for t in closers:
            t.join()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {
        "target": target,
        "live": len(live),
        "answered": answered,
        "stopped_by": stopped_by,
        "free_gib_before": free_before,
        "free_gib_after": free_after,
        "uss_mib": quantiles(uss),
    }


def ping_all(boxes: list[Sandbox]) -> int:
    ok: list[int] = []

    def run(part: list[Sandbox]) -> None:
        ok.append(sum(1 for sb in part if _pings(sb)))

    threads = [threading.Thread(target=run, args=(boxes[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok)


def _pings(sb: Sandbox) -> bool:
    try:
        return bool(sb.ping().get("pong"))
    except Exception:
        return False


def close_all(boxes: list[Sandbox]) -> None:
    for sb in boxes:
        with contextlib.suppress(Exception):
            sb.close()


# --- QEMU: restore from a migration file -------------------------------------------------------


def _qmp(path: Path, *commands: dict[str, Any], timeout: float = 30.0) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        stream.readline()  # greeting
        replies = []
        for command in [{"execute": "qmp_capabilities"}, *commands]:
            stream.write(json.dumps(command).encode() + b"\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline())
                if "return" in reply or "error" in reply:
                    replies.append(reply)
                    break
        return replies[1:]


def qemu_argv(qmp: Path, rootfs: Path) -> list[str]:
    workload = ["sh", "-c", f"echo {QEMU_MARKER.decode()}; exec sleep 1000000"]
    base = qemu_base_argv(DEFAULT_MEM_MIB, default_artifact("kernel"), default_artifact("initrd"),
                          "qemu-system-x86_64")  # fmt: skip
    return [
        *base, "-append", f"{qemu_cmdline(CMDLINE)} {ember_cmd_words(workload)}",
        "-drive", f"file={rootfs},if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip


def measure_qemu(runs: int, workdir: Path) -> dict[str, Any]:
    rootfs = default_artifact("rootfs")
    image = workdir / "qemu.migration"
    qmp = workdir / "qmp.sock"
    proc = subprocess.Popen(
        qemu_argv(qmp, rootfs),
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        seen = b""
        while QEMU_MARKER not in seen:  # the guest booted and runs its workload
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return {
                    "error": "QEMU exited while booting: " + seen[-300:].decode("utf-8", "replace")
                }
            seen = (seen + chunk)[-8192:]
        # Migrated while running, so the restored VM starts running on its own.
        _qmp(qmp, {"execute": "migrate", "arguments": {"uri": f"exec:cat > {image}"}})
        while _qmp(qmp, {"execute": "query-migrate"})[0]["return"].get("status") != "completed":
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    running: list[float] = []
    uss: list[float] = []
    for i in range(runs):
        sock = workdir / f"qmp{i}.sock"
        argv = [*qemu_argv(sock, rootfs), "-incoming", f"exec:cat {image}"]
        started = time.perf_counter()
        restored = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            while True:
                try:
                    status = _qmp(sock, {"execute": "query-status"})[0]["return"]["status"]
                except (OSError, ValueError, KeyError):
                    status = "starting"
                if status == "running":
                    break
                if restored.poll() is not None:
                    return {"error": f"QEMU restore exited with {restored.returncode}"}
                time.sleep(0.001)
            running.append((time.perf_counter() - started) * 1000)
            value = uss_mib(restored.pid)
            if value is not None:
                uss.append(value)
        finally:
            restored.kill()
            restored.wait()
    return {"ready_ms": quantiles(running), "uss_mib": quantiles(uss),
            "image_mib": image.stat().st_blocks * 512 / (1 << 20)}  # fmt: skip


def measure_subprocess(runs: int) -> dict[str, Any]:
    return {"ready_ms": quantiles([timed(lambda: subprocess.run(["true"], check=True))
                                   for _ in range(runs)])}  # fmt: skip


# --- report --------------------------------------------------------------------------------------


def measure_spares(runs: int, template: str | None = None, gap_s: float = 1.0) -> dict[str, Any]:
    """The same three figures when ``Sandbox()`` takes a spare (``keep_warm(1)``): restored
    and warmed in the background, and left waiting ``gap_s`` before each take, as a spare
    does between requests. The refill is not timed (it runs while the taker works)."""
    from ember import keep_warm
    from ember.sandbox.spares import spare_key, spare_pool
    from ember.spec import SandboxSpec

    key = spare_key(SandboxSpec(), template, False)
    keep_warm(1, template=template)
    ready: list[float] = []
    ping: list[float] = []
    code: list[float] = []
    life: list[float] = []
    taken = spare_pool().taken

    def take() -> float:
        spare_after(spare_pool(), key, gap_s)
        return time.perf_counter()

    try:
        for _ in range(runs):
            started = take()
            sb = Sandbox(template=template)
            ready.append((time.perf_counter() - started) * 1000)
            sb.ping()
            ping.append((time.perf_counter() - started) * 1000)
            sb.close()
            started = take()
            with Sandbox(template=template) as sb:
                value = sb.run_code("6*7").value
                code.append((time.perf_counter() - started) * 1000)
            assert value == "42", value
            started = take()
            with Sandbox(template=template) as box:
                assert box.exec(["true"]).exit_code == 0
            life.append((time.perf_counter() - started) * 1000)
    finally:
        keep_warm(0, template=template)
    return {
        "taken": spare_pool().taken - taken,
        "ready_ms": quantiles(ready),
        "ping_ms": quantiles(ping),
        "run_code_ms": quantiles(code),
        "lifecycle_ms": quantiles(life),
    }


def measure_gaps(runs: int, gaps: Sequence[float] = (0.0, 1.0, 3.0)) -> dict[str, Any]:
    """A live sandbox's ``ping`` and ``run_code('6*7')`` after the caller was idle for each of
    ``gaps`` seconds, as an interactive caller (an agent between tool calls) sees them: within
    the kept connection's life (5 s) the call reuses it; the ``run_code`` worker stops polling
    at most ``SPIN_MAX_S`` after a call, so later calls wake it (the guest bell)."""
    found: dict[str, Any] = {}
    with Sandbox() as sb:
        sb.ping()
        for gap in gaps:
            for name, call in (("ping", sb.ping), ("run_code", lambda: sb.run_code("6*7"))):
                call()
                times = []
                for _ in range(runs):
                    time.sleep(gap)
                    times.append(timed(call))
                found[f"{name}_after_{gap:g}s_ms"] = quantiles(times)
    return found


def measure_clock(runs: int) -> dict[str, Any]:
    """The guest's wall clock against the host's: ``time.time_ns()`` read in ``run_code``
    against the host's window around the call, in ms: how far the reading falls outside
    it (negative: before it, the guest is behind; 0: inside, all a reading can tell), for a
    restored sandbox's first call, its later ones, and a spare's second call."""
    from ember import keep_warm

    code = "import time\ntime.time_ns()"

    def offset(sb: Sandbox) -> float:
        before = time.time_ns()
        guest = int(sb.run_code(code).value or "0")
        after = time.time_ns()
        return (min(0, guest - before) + max(0, guest - after)) / 1e6

    first: list[float] = []
    later: list[float] = []
    spare: list[float] = []
    for _ in range(runs):
        with Sandbox() as sb:
            first.append(offset(sb))
            later.extend(offset(sb) for _ in range(3))
    keep_warm(1)
    try:
        for _ in range(min(runs, 5)):
            time.sleep(1.0)
            with Sandbox() as sb:
                offset(sb)
                spare.append(offset(sb))
    finally:
        keep_warm(0)
    return {
        "first_call_ms": quantiles(first),
        "later_calls_ms": quantiles(later),
        "spare_second_call_ms": quantiles(spare),
    }


def _q(report: dict[str, Any], *keys: str) -> tuple[str, str]:
    node: Any = report
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return "-", "-"
    return fmt_num(node.get("p50"), 1), fmt_num(node.get("p90"), 1)


def render(report: dict[str, Any]) -> str:
    rows = []
    for label, who, key in (
        ("ready (restore -> listening/running)", "ember", "ready_ms"),
        ("restore -> ping answered", "ember", "ping_ms"),
        ("restore -> run_code('6*7')", "ember", "run_code_ms"),
        ("create -> exec(true) -> destroy", "ember", "lifecycle_ms"),
        ("Sandbox() from a spare -> ready", "spare", "ready_ms"),
        ("Sandbox() from a spare -> ping answered", "spare", "ping_ms"),
        ("Sandbox() from a spare -> run_code('6*7')", "spare", "run_code_ms"),
        ("spare -> exec(true) -> destroy", "spare", "lifecycle_ms"),
        *(
            (f"live, {what} {gap:g} s after the last call", "gaps", f"{what}_after_{gap:g}s_ms")
            for what in ("ping", "run_code")
            for gap in (0.0, 1.0, 3.0)
        ),
        ("guest clock outside the call, restore -> 1st call", "clock", "first_call_ms"),
        ("guest clock outside the call, later calls", "clock", "later_calls_ms"),
        ("guest clock outside the call, a spare's 2nd call", "clock", "spare_second_call_ms"),
        ("ready (restore -> running)", "qemu", "ready_ms"),
        ("new process: subprocess true", "subprocess", "ready_ms"),
    ):
        rows.append([who, label, *_q(report, who, key)])
    lines = [format_table(["who", "what (ms)", "p50", "p90"], rows)]
    ember = report.get("ember", {})
    if "template_age_h" in ember:
        age = ember["template_age_h"]
        lines.append(
            f"template {ember['template']!r}, {age * 60:.1f} min old ({age:.2f} h), "
            f"{ember.get('prefault_pages', 0)} pages prefaulted per restore"
        )
    ember_ready = report.get("ember", {}).get("ready_ms", {}).get("p50")
    for peer in ("qemu", "subprocess"):
        base = report.get(peer, {}).get("ready_ms", {}).get("p50")
        if ember_ready and base:
            lines.append(f"ember ready / {peer}: {ember_ready / base:.2f}x")
    tp = report.get("throughput")
    if tp:
        lines.append(f"creations/s with {tp['parallel']} in parallel: {tp['per_s']:.1f}")
    dens = report.get("density")
    if dens:
        lines.append(
            f"live sandboxes: {dens['live']} of {dens['target']} ({dens['answered']} answered a "
            f"ping; stopped by {dens['stopped_by']}); free memory {dens['free_gib_before']:.1f} -> "
            f"{dens['free_gib_after']:.1f} GiB; USS per idle VMM p50 "
            f"{fmt_num(dens['uss_mib']['p50'], 1)} MiB (QEMU restored: "
            f"{fmt_num(report.get('qemu', {}).get('uss_mib', {}).get('p50'), 1)} MiB)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput window")
    parser.add_argument("--live", type=int, default=1000, help="density target (0: skip)")
    parser.add_argument("--idle", type=float, default=3.0, help="settle time before pinging all")
    parser.add_argument("--no-qemu", action="store_true")
    parser.add_argument("--no-spares", action="store_true", help="skip the keep_warm figures")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--age-hours",
        type=float,
        default=None,
        help="measure a template at least this old (waits for it if needed)",
    )
    args = parser.parse_args(argv)
    template = aged_template(args.age_hours) if args.age_hours is not None else None
    report: dict[str, Any] = {"ember": measure_ember(args.runs, template)}
    if not args.no_spares:
        report["spare"] = measure_spares(args.runs, template)
    report["gaps"] = measure_gaps(min(args.runs, 10))
    report["clock"] = measure_clock(min(args.runs, 10))
    report["subprocess"] = measure_subprocess(args.runs)
    if not args.no_qemu:
        with tempfile.TemporaryDirectory(prefix="ember-bench-") as workdir:
            report["qemu"] = measure_qemu(min(args.runs, 10), Path(workdir))
    report["throughput"] = measure_throughput(args.parallel, args.seconds)
    if args.live:
        report["density"] = measure_density(args.live, args.idle)
    print(to_json(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

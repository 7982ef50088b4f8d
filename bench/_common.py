"""Shared plumbing for the side-by-side benchmarks in ``bench/``.

Every bench compares Ember with a peer measured in the same run on the same inputs (DESIGN.md §6),
so they all need the same few things: run a VMM process while watching its console for a marker,
time it with a monotonic clock, take the peak RSS of *that* process, and summarise repeated runs
as medians and ratios in a table or JSON. Keeping that here means every bench measures the same
way, and the pure parts (summaries, formatting, marker scanning) are unit-tested once
(``tests/unit/test_bench_common.py``) without /dev/kvm.

Stdlib only: a bench must run from a bare checkout on a fresh host.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: What the test initramfs prints once PID 1 runs in the guest: the moment "boot" is over.
MARKER = b"EMBER-USERSPACE-OK"

#: Console bytes kept per run, for the marker line and for the error report of a failed run.
TAIL_BYTES = 16 * 1024

#: After the process exits, how long to wait for its pipes to drain. A grandchild that inherited
#: the pipe (it should not exist, but a VMM might leak one) must not hang the bench.
DRAIN_S = 2.0

#: How long a process gets after SIGTERM before SIGKILL, when a run times out.
TERM_GRACE_S = 3.0


class MarkerScanner:
    """Finds the first occurrence of a marker in a byte stream delivered in arbitrary chunks.

    Pipes hand over whatever the kernel has buffered, so the marker can straddle two reads: the
    scanner carries the last ``len(marker) - 1`` bytes of the previous chunk into the next
    search. It also keeps a bounded tail of the output, for the marker line and error reports.
    """

    def __init__(self, marker: bytes = MARKER, tail_bytes: int = TAIL_BYTES) -> None:
        if not marker:
            raise ValueError("marker must not be empty")
        self.marker = marker
        self.found_at: float | None = None
        self._carry = b""
        self._tail = bytearray()
        self._tail_bytes = tail_bytes
        self._line = bytearray()
        self._line_open = False

    def feed(self, data: bytes, now: float) -> bool:
        """Scan ``data`` read at time ``now``; return True if this chunk completed the marker.

        The timestamp recorded is that of the chunk holding the marker's last byte: the first
        moment the reader could have known the marker was there.
        """
        self._keep_tail(data)
        if self.found_at is not None:
            self._extend_line(data)
            return False
        window = self._carry + data
        at = window.find(self.marker)
        if at < 0:
            keep = len(self.marker) - 1
            self._carry = window[-keep:] if keep else b""
            return False
        self.found_at = now
        self._carry = b""
        line_start = window.rfind(b"\n", 0, at) + 1
        self._line_open = True
        self._extend_line(window[line_start:])
        return True

    @property
    def marker_line(self) -> str | None:
        """The console line holding the marker (e.g. with the guest's kernel release), if seen."""
        if self.found_at is None:
            return None
        return bytes(self._line).decode("utf-8", "replace").strip()

    @property
    def tail(self) -> bytes:
        """The last ``tail_bytes`` bytes of output seen."""
        return bytes(self._tail)

    def _keep_tail(self, data: bytes) -> None:
        self._tail += data
        excess = len(self._tail) - self._tail_bytes
        if excess > 0:
            del self._tail[:excess]

    def _extend_line(self, data: bytes) -> None:
        if not self._line_open:
            return
        end = data.find(b"\n")
        if end >= 0:
            data = data[:end]
            self._line_open = False
        self._line += data[: max(0, 512 - len(self._line))]


@dataclass
class RunResult:
    """One measured run of one process. Times are seconds since just before it was spawned."""

    ok: bool
    marker_s: float | None
    exit_s: float | None
    peak_rss_kib: int | None
    cpu_s: float | None
    returncode: int | None
    error: str | None = None
    marker_line: str | None = None
    tail: bytes = field(default=b"", repr=False)

    @property
    def peak_rss_mib(self) -> float | None:
        return None if self.peak_rss_kib is None else self.peak_rss_kib / 1024.0

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: everything but the raw console tail (which goes in ``error`` if bad)."""
        return {
            "ok": self.ok,
            "marker_s": self.marker_s,
            "exit_s": self.exit_s,
            "peak_rss_mib": self.peak_rss_mib,
            "cpu_s": self.cpu_s,
            "returncode": self.returncode,
            "error": self.error,
            "marker_line": self.marker_line,
        }


def run_measured(
    argv: Sequence[str],
    *,
    timeout_s: float,
    marker: bytes = MARKER,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> RunResult:
    """Spawn ``argv``, timestamp ``marker`` on its stdout, wait for it to exit, measure it.

    The clock starts just before the spawn, so Python/QEMU start-up is part of the figure, as a
    user would see it. Peak RSS is ``ru_maxrss`` from ``wait4`` of the direct child, i.e. the VMM
    process itself (no shell in between; its descendants are not counted). Exit is noticed
    through a pidfd, not pipe EOF, so a leaked pipe holder cannot distort the exit time.

    A run is ok when the marker appeared and the process exited with status 0 before the
    timeout; anything else is recorded in ``error`` rather than raised, so one bad boot does not
    lose the others. The process runs in its own session and a timeout kills the whole group.
    """
    scanner = MarkerScanner(marker)
    stderr_tail = MarkerScanner(marker, tail_bytes=4096)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        return RunResult(False, None, None, None, None, None, error=f"cannot start: {exc}")
    assert proc.stdout is not None and proc.stderr is not None
    pidfd = os.pidfd_open(proc.pid)
    sel = selectors.DefaultSelector()
    streams = {proc.stdout.fileno(): scanner, proc.stderr.fileno(): stderr_tail}
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    sel.register(pidfd, selectors.EVENT_READ)
    deadline = started + timeout_s
    timed_out = False
    status = rusage = None
    exit_at: float | None = None
    try:
        while exit_at is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                _kill_group(proc.pid, pidfd)
                remaining = TERM_GRACE_S + 5.0
            # Pipes before the pidfd: output written just before exit belongs before the exit.
            ready = sorted(sel.select(remaining), key=lambda ev: ev[0].fd == pidfd)
            for key, _ in ready:
                if key.fd == pidfd:
                    _, status, rusage = os.wait4(proc.pid, 0)
                    exit_at = time.monotonic()
                    break
                _read_into(key.fd, streams[key.fd], sel)
        _drain(sel, streams, pidfd)
    except BaseException:
        # ^C or a bug here: never leave a VMM running behind the bench.
        _kill_group(proc.pid, pidfd)
        with contextlib.suppress(ChildProcessError):
            os.wait4(proc.pid, 0)
        raise
    finally:
        sel.close()
        os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    assert status is not None and rusage is not None
    returncode = os.waitstatus_to_exitcode(status)
    proc.returncode = returncode  # reaped by wait4 above; stop Popen from waiting again
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers left in the group, if any
    marker_s = None if scanner.found_at is None else scanner.found_at - started
    error = None
    if timed_out:
        error = f"timed out after {timeout_s:g} s"
    elif marker_s is None:
        error = f"exited with status {returncode} without printing {marker.decode()}"
    elif returncode != 0:
        error = f"printed the marker, then exited with status {returncode}"
    if error is not None:
        error += _tail_note(scanner.tail, stderr_tail.tail)
    return RunResult(
        ok=error is None,
        marker_s=marker_s,
        exit_s=None if timed_out else exit_at - started,
        peak_rss_kib=rusage.ru_maxrss,
        cpu_s=rusage.ru_utime + rusage.ru_stime,
        returncode=returncode,
        error=error,
        marker_line=scanner.marker_line,
        tail=scanner.tail,
    )


def _read_into(fd: int, scanner: MarkerScanner, sel: selectors.BaseSelector) -> None:
    now = time.monotonic()
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return
    if data:
        scanner.feed(data, now)
    else:
        sel.unregister(fd)


def _drain(sel: selectors.BaseSelector, streams: Mapping[int, MarkerScanner], pidfd: int) -> None:
    """Read what the exited process left in its pipes, for at most ``DRAIN_S`` seconds."""
    with contextlib.suppress(KeyError):
        sel.unregister(pidfd)
    end = time.monotonic() + DRAIN_S
    while sel.get_map() and (left := end - time.monotonic()) > 0:
        for key, _ in sel.select(left):
            _read_into(key.fd, streams[key.fd], sel)


def _kill_group(pid: int, pidfd: int) -> None:
    """SIGTERM the process group, then SIGKILL it if the leader is still there after a grace."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    sel = selectors.DefaultSelector()
    try:
        sel.register(pidfd, selectors.EVENT_READ)
        if not sel.select(TERM_GRACE_S):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    finally:
        sel.close()


def _tail_note(stdout_tail: bytes, stderr_tail: bytes) -> str:
    parts = []
    for name, raw in (("console", stdout_tail), ("stderr", stderr_tail)):
        lines = raw.decode("utf-8", "replace").strip().splitlines()[-3:]
        if lines:
            parts.append(f"{name}: " + " | ".join(line.strip() for line in lines))
    return "".join(f"; last {p}" for p in parts)


@dataclass(frozen=True)
class Summary:
    """Median, min and max of the successful runs' values, and how many there were."""

    p50: float
    min: float
    max: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"p50": self.p50, "min": self.min, "max": self.max, "n": self.n}


def summarize(values: Sequence[float | None]) -> Summary | None:
    """Summarise the known values; None if there are none (every run failed)."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    return Summary(statistics.median(known), min(known), max(known), len(known))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either side is missing or the base is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def p50(vmm_report: Mapping[str, Any], key: str) -> float | None:
    """The median of one figure in a per-VMM report (None when no run succeeded)."""
    stats = vmm_report.get(key)
    return None if stats is None else float(stats["p50"])


def ember_over_qemu(vmms: Mapping[str, Any], keys: Sequence[str]) -> dict[str, float | None] | None:
    """Ember/QEMU ratios of the medians, when both VMMs ran."""
    if "ember" not in vmms or "qemu" not in vmms:
        return None
    return {key: ratio(p50(vmms["ember"], key), p50(vmms["qemu"], key)) for key in keys}


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time process ``pid`` has used, all its threads (a VMM's vCPUs
    included), from ``/proc/PID/stat``: tick-grained, so compare it over a series."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def side_by_side(
    ours: Mapping[str, Any], peer: Mapping[str, Any], rows: Sequence[tuple[str, str, int]]
) -> list[list[str]]:
    """Table rows for a bench whose peer ran the same figures: for each ``(label, key,
    digits)``, both sides' p50 (``ours[key]["p50"]``; a dash where every run failed) and
    ours over the peer's."""
    table = []
    for label, key, digits in rows:
        a, b = (None if side.get(key) is None else float(side[key]["p50"]) for side in (ours, peer))
        table.append([label, fmt_num(a, digits), fmt_num(b, digits), fmt_ratio(ratio(a, b))])
    return table


def fmt_num(value: float | None, digits: int = 2) -> str:
    """A table cell for a number; a dash when the figure is missing (e.g. every run failed)."""
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_range(low: float | None, high: float | None, digits: int = 2) -> str:
    """A "min-max" cell; a dash when the figures are missing."""
    if low is None or high is None:
        return "-"
    return f"{low:.{digits}f}-{high:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the numeric ones right-aligned.

    Plain text rather than a library so the bench stays stdlib-only and its output pastes into
    an issue or a commit message as is.
    """
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}: {row!r}")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def to_json(obj: Any) -> str:
    """Stable, human-readable JSON, floats rounded to the microsecond/kibibyte level."""
    return json.dumps(_round_floats(obj), indent=2, sort_keys=True)


def _round_floats(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _round_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round_floats(v) for v in obj]
    return obj


def page_cache_fraction(path: str | os.PathLike[str]) -> float | None:
    """How much of the file at ``path`` sits in the host page cache now, from 0.0 to 1.0.

    A bench that reads a disk image must say whether a run started cold (the host had to read
    the disk) or warm (the VMM was served from memory). ``mincore(2)`` on a read-only shared
    mapping answers that without touching the pages, so asking does not warm anything. None if
    the kernel or libc will not say (the figure is then just not reported).
    """
    import ctypes
    import mmap

    size = os.stat(path).st_size
    if size == 0:
        return 1.0
    page = os.sysconf("SC_PAGE_SIZE")
    pages = (size + page - 1) // page
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        )
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    except (OSError, AttributeError):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in vec) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def spare_after(pool: Any, key: object, gap_s: float, timeout: float = 120.0) -> None:
    """Return once a spare of ``key`` (``ember.sandbox.spares``) has waited ``gap_s``, as one
    does between a user's requests; a bench with no spare after ``timeout`` stops."""
    if not pool.wait_ready(key, 1, timeout):
        raise SystemExit(f"no spare was made in {timeout:g} s")
    time.sleep(gap_s)

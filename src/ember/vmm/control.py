"""The VMM's control socket: snapshot, pause and resume a running VM from outside.

One request per connection, one JSON object per line each way, served on
the event thread (so no device callback runs during a snapshot)::

    {"op": "snapshot", "durable": false} + 2 fds  ->  {"ok": true, "paused_ms": ...}
    {"op": "snapshot", "path": "/dir"}            (unjailed VMMs only: a jailed one refuses it)
    {"op": "pause"} / {"op": "resume"} / {"op": "status"}
    {"op": "profile-start", "hz": 1000} / {"op": "profile-stop"} -> RIP samples (vmm/profiler)
    {"op": "kvm-stats"}  ->  {"ok": true, "vm": {...}, "vcpus": {...}}: KVM's counters
                       (ember.kvm.stats), the vCPUs' summed
    {"op": "prefault-exec"}  ->  {"ok": true, "pages": N, "left": K}: copy the pages the next
                       exec writes (ember.snapshot.prefault.EXEC_FILES); K sets are left
    {"op": "shm"}  ->  {"ok": true, "base": ..., "size": ...} + the memory channels' memfd
                       and one doorbell eventfd per slot (see ember.vmm.shm)

A snapshot's two files (state, memory) travel as open fds (SCM_RIGHTS):
the requester creates them where it likes, and a jailed VMM, which sees no
host path, writes them all the same.  Only the sandbox's owner can reach
the socket: it lives in the sandbox's private directory.  A malformed
request gets ``{"ok": false, "error": ...}``.  Requests are capped at
``MAX_REQUEST`` bytes and replies at ``MAX_REPLY``: a reply that would be
larger (its content comes partly from the guest) is replaced by an error
reply, so the client never meets a line it refuses to read.  With ``debug=True`` (``ember
boot --debug-hooks``, for tests of the jail) two more ops exist:
``debug-open`` tries to open a path from inside the VMM and
``debug-syscall`` makes a forbidden system call (execve or ptrace).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import EmberError

if TYPE_CHECKING:  # the server's side only: the SDK imports this module for request()
    from ember.vmm.event_loop import EventLoop
    from ember.vmm.machine import Machine
    from ember.vmm.profiler import GuestProfiler

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST = 64 * 1024
MAX_REPLY = 1024 * 1024  # status and balloon replies are a few KiB: this is a wide margin


class ControlServer:
    def __init__(
        self,
        path: Path,
        machine: Machine,
        events: EventLoop,
        *,
        debug: bool = False,
        jailed: bool = False,
    ) -> None:
        self.path = path
        self.machine = machine
        self.debug = debug
        self.jailed = jailed  # no host paths, and its seccomp filter kills on opening for write
        self.events = events
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(path))
            self._sock.listen(8)
        except OSError as exc:
            self._sock.close()
            raise EmberError(f"cannot listen on control socket {path}: {exc.strerror}") from None
        events.add_reader(self._sock.fileno(), self._on_accept)
        self._reply_fds: list[int] = []
        self._profiler: GuestProfiler | None = None  # fds the current reply carries (still ours)

    def _on_accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        fds: list[int] = []
        with conn:
            conn.settimeout(REQUEST_TIMEOUT_S)
            try:
                request, fds = _read_line(conn)
                reply = self.handle(json.loads(request), fds)
            except (OSError, ValueError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            finally:
                for fd in fds:
                    os.close(fd)
            reply_fds, self._reply_fds = self._reply_fds, []
            try:
                if reply_fds and reply.get("ok"):
                    socket.send_fds(conn, [_encode_reply(reply)], reply_fds)
                else:
                    conn.sendall(_encode_reply(reply))
            except OSError:
                pass

    def handle(self, request: Any, fds: list[int] | None = None) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": "a request is an object with an 'op'"}
        op = request["op"]
        fds = fds or []
        try:
            if op == "snapshot":
                return self._snapshot(request, fds)
            if op.startswith("debug-") and self.debug:
                return _debug(op, request)
            if op == "balloon":
                return self._balloon(request)
            if op == "shm":
                shm = self.machine.shm
                if shm is None:
                    return {"ok": False, "error": "this VM has no memory channels (no vsock)"}
                self._reply_fds = shm.fds()
                return {"ok": True, **shm.describe()}
            if op == "prefault-exec":  # the SDK, before a sandbox's first exec
                pages, left = self.machine.prefault_exec()
                return {"ok": True, "pages": pages, "left": left}
            if op == "pause":
                self.machine.pause()
                return {"ok": True}
            if op == "resume":
                self.machine.resume()
                return {"ok": True}
            if op == "profile-start":
                return self._profile_start(request)
            if op == "profile-stop":
                return self._profile_stop()
            if op == "kvm-stats":
                return {"ok": True, **self.machine.kvm_stats()}
            if op == "status":
                return {
                    "ok": True,
                    "paused": self.machine.paused,
                    "pit": self.machine.vm.has_pit,  # a restore leaves out a masked PIT
                    "made_ahead": self.machine.made_ahead,  # snapshot.premade
                    "pid": os.getpid(),
                    "host_connections": self.machine.host_connections(),
                    "devices": self.machine.device_stats(),
                    "vcpu_cpu_s": [t.cpu_seconds() for t in self.machine.vcpu_threads],
                    # The zygote's heap, still frozen here, is shared with every other VMM
                    # (ember.zygote); collections per generation show what the GC costs.
                    "gc_frozen": gc.get_freeze_count(),
                    "gc_collections": [s["collections"] for s in gc.get_stats()],
                }
        except EmberError as exc:
            return {"ok": False, "error": str(exc)}
        except OSError as exc:
            return {"ok": False, "error": f"{exc.strerror or exc}"}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _profile_start(self, request: dict[str, Any]) -> dict[str, Any]:
        hz = request.get("hz", 1000)
        if not isinstance(hz, int | float) or isinstance(hz, bool):
            return {"ok": False, "error": "'hz' must be a number"}
        if self._profiler is not None:
            return {"ok": False, "error": "a profile is already running"}
        from ember.vmm.profiler import GuestProfiler

        try:
            self._profiler = GuestProfiler(self.events, list(self.machine.vcpu_threads), float(hz))
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True}

    def _profile_stop(self) -> dict[str, Any]:
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return {"ok": False, "error": "no profile is running"}
        return {"ok": True, **profiler.stop()}

    def _snapshot(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        durable = bool(request.get("durable"))
        if len(fds) == 2:
            timings = self.machine.snapshot(fds[0], fds[1], durable=durable)
            return {"ok": True, **timings}
        path = request.get("path")
        if not isinstance(path, str) or not path:
            return {"ok": False, "error": "snapshot needs two fds (state, memory) or a 'path'"}
        if self.jailed:
            return {"ok": False, "error": "a jailed VMM sees no host path: send two fds instead"}
        from ember.vmm.machine_state import open_snapshot_files

        state_fd, memory_fd = open_snapshot_files(Path(path))
        try:
            timings = self.machine.snapshot(state_fd, memory_fd, durable=durable)
        finally:
            os.close(state_fd)
            os.close(memory_fd)
        return {"ok": True, **timings}

    def _balloon(self, request: dict[str, Any]) -> dict[str, Any]:
        """Set the balloon's target and/or ask for fresh guest statistics; report its state."""
        from ember.devices.virtio.balloon.device import NUM_PAGES_MAX, Balloon

        balloon = self.machine.device(Balloon)
        if balloon is None:
            return {"ok": False, "error": "this VM has no balloon device"}
        mem_pages = self.machine.memory.size // 4096
        target = request.get("target_pages")
        if target is not None:
            # num_pages is le32 (virtio 1.2 §5.5.4); more pages than the VM has means nothing.
            limit = min(mem_pages, NUM_PAGES_MAX)
            if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target <= limit:
                return {
                    "ok": False,
                    "error": f"target_pages must be an integer from 0 to {limit} "
                    f"(the VM's {mem_pages} pages), not {str(target)[:40]}",
                }
            balloon.set_target(target)
        if request.get("refresh_stats"):
            balloon.request_stats()
        return {
            "ok": True,
            "mem_pages": mem_pages,
            "target_pages": balloon.target_pages,
            "actual_pages": balloon.actual_pages,
            "guest_stats": dict(balloon.guest_stats),
            "stats_updates": balloon.stats.stats_updates,
            "reported_bytes": balloon.stats.reported_bytes,
        }

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _debug(op: str, request: dict[str, Any]) -> dict[str, Any]:
    """Test hooks: what the jail lets a (compromised) VMM do, tried from inside it."""
    if op == "debug-open":
        try:
            os.close(os.open(str(request.get("path")), os.O_RDONLY))
        except OSError as exc:
            return {"ok": True, "opened": False, "error": exc.strerror}
        return {"ok": True, "opened": True}
    if op == "debug-syscall":
        import ctypes

        numbers = {"execve": 59, "ptrace": 101}  # x86_64
        name = str(request.get("name"))
        if name not in numbers:
            return {"ok": False, "error": f"debug-syscall knows {sorted(numbers)}"}
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.syscall(numbers[name], 0, 0, 0)
        return {"ok": True, "result": result, "errno": ctypes.get_errno()}
    return {"ok": False, "error": f"unknown debug op {op!r}"}


def _encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply line, at most MAX_REPLY bytes: a larger one becomes an error reply."""
    line = json.dumps(reply).encode() + b"\n"
    if len(line) > MAX_REPLY:
        log.warning("control: a %d-byte reply exceeds %d bytes", len(line), MAX_REPLY)
        error = f"the reply ({len(line)} bytes) exceeds the control socket's {MAX_REPLY} bytes"
        line = json.dumps({"ok": False, "error": error}).encode() + b"\n"
    return line


def _read_line(conn: socket.socket, limit: int = MAX_REQUEST) -> tuple[bytes, list[int]]:
    """One line (and the fds that came with it), refused with ValueError past ``limit``."""
    data = bytearray()
    fds: list[int] = []
    while not data.endswith(b"\n"):
        chunk, new_fds, _flags, _addr = socket.recv_fds(conn, 65536, 16)
        fds.extend(new_fds)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"line longer than {limit} bytes")
    return bytes(data), fds


def request(
    socket_path: Path | str,
    op: str,
    timeout: float = 120.0,
    fds: list[int] | None = None,
    **args: Any,
) -> dict[str, Any]:
    """Client side: send one request (and ``fds``), return the reply (raises EmberError)."""
    reply, received = request_fds(socket_path, op, timeout, fds, **args)
    for fd in received:
        os.close(fd)
    return reply


def request_fds(
    socket_path: Path | str,
    op: str,
    timeout: float = 120.0,
    fds: list[int] | None = None,
    **args: Any,
) -> tuple[dict[str, Any], list[int]]:
    """:func:`request`, also returning the fds the reply carried (the caller's to close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path))
            socket.send_fds(sock, [json.dumps({"op": op, **args}).encode() + b"\n"], fds or [])
            data, received = _read_line(sock, MAX_REPLY)
        except OSError as exc:
            raise EmberError(f"the VMM's control socket did not answer: {exc}") from None
        except ValueError as exc:  # the VMM bounds its replies: this one is not from it
            raise EmberError(f"the VMM's control socket sent an oversized reply ({exc})") from None
    try:
        if not data:
            raise EmberError(f"the VMM closed the control connection without answering {op!r}")
        try:
            reply: dict[str, Any] = json.loads(data)
        except ValueError:
            raise EmberError("the VMM's control socket sent garbage") from None
        if not reply.get("ok"):
            raise EmberError(f"VMM {op} failed: {reply.get('error')}")
    except BaseException:
        for fd in received:
            os.close(fd)
        raise
    return reply, received

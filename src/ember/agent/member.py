"""One pre-started interpreter as the agent sees it: how it is started (or taken from the
mother's fork), the messages on its control socket, its pipes, and its end.

Split from :mod:`ember.agent.pool`, which decides when members start and whom they serve;
:mod:`ember.agent.pystart` is the interpreter's side.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from typing import IO, Any

from ember.agent.adopt import adopt

START_TIMEOUT_S = 600.0  # running time (stopped time excluded) a start may take
DEATH_WAIT_S = 5.0  # for a start whose control socket closed to be reaped
BACKGROUND_NICE = 19  # the mother, her forks' warm-ups and holders' deaths (see pool)
MEMBER, MOTHER = "member", "mother"  # the roles pystart takes
NO_PIPES = ((-1, -1, -1), (-1, -1, -1))  # a mother's: she runs no program

# Runs STARTUP_FILES in a namespace of their own (nothing imported, nothing on sys.path),
# then runs the program from this frame, so the program's module frame sits right on it.
BOOT = """\
import sys
_ember = set(sys.modules)
_ember_ns = {"__name__": "ember_pystart", "__builtins__": __builtins__}
for _ember_path in sys.argv[1].split(":"):
    with open(_ember_path, "rb") as _ember_file:
        exec(compile(_ember_file.read(), _ember_path, "exec"), _ember_ns)
del _ember_file, _ember_path
_ember = _ember_ns["wait"](sys.argv[2:], globals(), _ember)
del _ember_ns
_ember_exc = _ember_end = None
try:
    _ember.call(*_ember.args)
except SystemExit as _ember_caught:
    _ember.finish()
    _ember_end = _ember_caught
except BaseException as _ember_caught:
    _ember_exc = _ember_caught
else:
    _ember.finish()
if _ember_exc is not None:  # reported outside the handler, as PyErr_Print does
    try:
        _ember.uncaught(_ember_exc)
    except SystemExit as _ember_caught:
        _ember_end = _ember_caught
    _ember_exc = None
_ember.end(_ember_end)  # exits, unless python3's own finalisation must run
if _ember_end is not None:
    raise _ember_end
"""
# What a pre-started interpreter runs, in this order, in one namespace (see ember.agent.pybase).
STARTUP_FILES = ":".join(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    for name in ("pybase", "pymain", "pyjob", "pywarm", "pyclone", "pystart")
)


@dataclass
class Member:
    """One interpreter, its control socket and the pipes its program will get."""

    proc: subprocess.Popen[bytes]
    ctl: socket.socket
    ours: tuple[int, int, int]  # stdin write, stdout read, stderr read
    theirs: tuple[int, int, int]  # stdin read, stdout write, stderr write: sent at hand-over
    info: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False
    timed_out: bool = False
    forked: bool = False
    lifted: bool = False  # a mother's or forked member's nice 19 lifted (see pool._foreground)

    @property
    def holder(self) -> int:
        pid = self.info.get("holder")
        return pid if isinstance(pid, int) and pid > 0 else 0

    def pause(self) -> None:
        """Stop a start (``SIGSTOP``) while a request or a cell runs: its work is emulated
        guest-kernel time taken from theirs."""
        self.stopped = True
        send_signal(self.proc.pid, signal.SIGSTOP)

    def go_on(self) -> None:
        self.stopped = False
        send_signal(self.proc.pid, signal.SIGCONT)

    def background(self) -> None:
        """Back to nice 19, where the mother and forked members do their own work."""
        self.lifted = False
        renice(self.proc.pid, BACKGROUND_NICE)

    def close_fds(self, *, theirs_only: bool = False) -> None:
        fds = self.theirs if theirs_only else (*self.ours, *self.theirs)
        for fd in fds:
            if fd < 0:
                continue  # a mother has no program pipes
            try:
                os.close(fd)
            except OSError:
                pass
        if not theirs_only:
            self.ctl.close()


def read_message(sock: socket.socket) -> dict[str, Any] | None:
    import marshal

    def exact(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    try:
        message = marshal.loads(exact(int.from_bytes(exact(4), "big")))
    except (EOFError, OSError, ValueError):
        return None
    return message if isinstance(message, dict) else None


def send_message(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...]) -> None:
    import marshal

    data = marshal.dumps(message)
    data = len(data).to_bytes(4, "big") + data
    sent = socket.send_fds(sock, [data[:4096]], list(fds))
    if sent < len(data):  # an empty send is a system call too, and each costs this guest
        sock.sendall(data[sent:])


def spawn(
    python: str,
    env: dict[str, str],
    role: str,
    *,
    generation: int,
    heap: int,
    preload: tuple[str, ...],
) -> Member:
    """Start an interpreter in ``role`` (:data:`MEMBER` or :data:`MOTHER`); OSError if not."""
    ours, theirs = socket.socketpair()
    argv = [
        python, "-c", BOOT, STARTUP_FILES, str(theirs.fileno()),
        str(generation), str(heap), role, *preload,
    ]  # fmt: skip
    try:
        # stdin /dev/null, stdout and stderr pipes: the files a program's streams are made
        # on, so python3's own sys.stdin/stdout/stderr serve it as they are (no system calls
        # at hand-over); the program gets pipes of its own on the same descriptors.
        proc = subprocess.Popen(
            argv,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    ends = pipes() if role == MEMBER else NO_PIPES
    return Member(proc, ours, ends[0], ends[1])


def forked(python: str, pid: int, ctl: socket.socket) -> Member:
    """The member the mother forked as ``pid`` (the agent's child: CLONE_PARENT)."""
    proc = adopt(pid, [python, "-c", BOOT, STARTUP_FILES, "(forked)"])
    ends = pipes()
    return Member(proc, ctl, ends[0], ends[1], forked=True)


def describe_death(member: Member) -> str:
    """Why a start ended without ``ready``: its exit (waited for briefly: its control
    socket closes a moment before it can be reaped) and the end of what it printed."""
    try:
        code: int | None = member.proc.wait(0 if member.timed_out else DEATH_WAIT_S)
    except subprocess.TimeoutExpired:
        code = None
    if code is None and member.timed_out:
        what = f"did not become ready in {START_TIMEOUT_S:.0f} s of running time"
    elif code is None:
        what = "closed its control socket while starting, and lives on"
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
        what = f"was killed by {name} while starting"
        if code == -signal.SIGKILL:
            what += " (the guest's OOM killer, if nothing else sent it)"
    else:
        what = f"exited with status {code} while starting"
    said = _tail(member.proc.stderr) if code is not None else ""
    return f"a pre-started interpreter {what}" + (f": {said}" if said else "")


def discard(member: Member) -> None:
    member.close_fds()
    for startup in (member.proc.stdout, member.proc.stderr):
        if startup is not None:
            startup.close()
    send_signal(member.proc.pid, signal.SIGKILL, group=True)
    try:
        member.proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    if member.holder:
        kill_holder(member.holder)


def pipes() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A program's three pipes: (stdin write, stdout read, stderr read) for the agent,
    (stdin read, stdout write, stderr write) for the program."""
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    return (stdin_w, stdout_r, stderr_r), (stdin_r, stdout_w, stderr_w)


def _tail(stream: IO[bytes] | None, limit: int = 4096) -> str:
    """The last line of what a dead start wrote (its pipe: nothing more can come)."""
    if stream is None:
        return ""
    try:
        os.set_blocking(stream.fileno(), False)
        data = os.read(stream.fileno(), 1 << 16)[-limit:]
    except (OSError, ValueError):
        return ""
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def send_signal(pid: int, signum: int, *, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def renice(pid: int, priority: int) -> None:
    """Set a member's (or holder's) nice value; one that died meanwhile is its reaper's news."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, priority)
    except OSError:
        pass


def kill_holder(pid: int) -> None:
    """Kill and reap a holder (the agent is its parent: it was cloned with CLONE_PARENT).
    Its death frees the program's memory, seconds of guest-kernel work, in its own context:
    at nice 19 a request arriving meanwhile gets the vCPU."""
    renice(pid, BACKGROUND_NICE)
    send_signal(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass

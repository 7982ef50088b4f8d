"""Inside a pre-started interpreter: its two ``clone`` system calls, the holder (a task
sharing its memory, so that the program's exit is cheap) and the mother's forks (members whose
parent is the agent).

Standard library only (it runs in the guest; see :mod:`ember.agent.pybase` for how).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # no run-time import: these files must not add to sys.modules
    from typing import Any

if __name__ != "ember_pystart":  # imported as a module; in BOOT's namespace they are there
    from ember.agent.pybase import _receive_job, _send


HOLDER_STACK = 64 << 10
PROT_RW = 0x1 | 0x2  # PROT_READ | PROT_WRITE
MAP_STACK_FLAGS = 0x02 | 0x20 | 0x20000  # MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK
MAP_FAILED = (1 << 64) - 1  # (void *) -1 as ctypes gives it back
CLONE_VM = 0x100
CLONE_PARENT = 0x8000
CLONE_CHILD_SETTID = 0x01000000
SIGCHLD = 17
SYS_PAUSE = 34  # x86_64
SYS_CLONE = 56
SYS_GETTID = 186
TID_OFFSET = 0x2D0  # of ``tid`` in glibc's struct pthread, x86_64 (checked: _Forker)


def _make_holder(keep: list[Any]) -> int:
    """Clone a task that shares this process's memory and only sleeps (see the pool's docs).

    ``clone(syscall, stack, CLONE_VM | CLONE_PARENT | SIGCHLD, SYS_pause)``: the new task runs
    ``syscall(SYS_pause)`` on a small stack of its own and nothing else, never Python code. Its
    parent is the agent, so the program never sees an extra child. It is cloned while this
    process holds no descriptor but /dev/null and the agent's socket: a copy of the program's
    pipes in its descriptor table would keep them open after the program's exit.
    """
    if os.uname().machine != "x86_64":
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        # A mapping of its own, never unmapped (a signal handler may run on it), not a
        # buffer from the heap: that would be zeroed whole, 16 page faults in a forked
        # member (copy-on-write ones, ~2-3 ms each here); the holder touches only its top.
        mmap = libc.mmap
        mmap.restype = ctypes.c_void_p
        mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int, ctypes.c_long]  # fmt: skip
        base = mmap(None, HOLDER_STACK, PROT_RW, MAP_STACK_FLAGS, -1, 0)
        if base is None or base == MAP_FAILED:
            return 0
        keep.append(base)
        top = (base + HOLDER_STACK - 64) & ~15
        clone = libc.clone
        clone.restype = ctypes.c_int
        clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        entry = ctypes.cast(libc.syscall, ctypes.c_void_p)
        pid = clone(entry, top, CLONE_VM | CLONE_PARENT | SIGCHLD, ctypes.c_void_p(SYS_PAUSE))
        return pid if pid > 0 else 0
    except Exception:
        return 0  # no holder: the program's exit just costs what a real process's does


def holder_without(fd: int, keep: list[Any]) -> tuple[int, int]:
    """A holder for this process (the run_code worker), cloned while descriptor ``fd`` (the
    agent's socket) is out of its descriptor table; (the holder's pid or 0, ``fd`` as it is
    numbered now).

    The holder makes the worker's death cheap as a member's (~4 s less for the template's
    worker here): the agent hears of it by the socket's end, so the holder must not hold a
    copy. While it is cloned, the socket's one reference is in flight in an ``SCM_RIGHTS``
    message to ourselves, received back after. Anything failing before: no holder, ``fd`` as
    it was (the death then costs what it did).
    """
    import socket

    try:
        ours, back = socket.socketpair()
    except OSError:
        return 0, fd
    with ours, back:
        try:
            socket.send_fds(ours, [b"s"], [fd])
        except OSError:
            return 0, fd
        os.close(fd)
        ours.close()
        holder = _make_holder(keep)
        _, fds, _, _ = socket.recv_fds(back, 1, 1)
    return holder, fds[0]


def _trim_heap() -> None:
    """Give the free pages of the mother's heap back to the guest kernel (``malloc_trim``).

    The pool's malloc settings (``ember.agent.heap``) keep freed memory in the heap, which is
    right for a member's program but not for her: what the preload and ``warm_numpy`` freed
    (~10 MiB of her ~26 MiB heap) stayed resident, and every fork copies a page-table entry
    for each of those pages, every child's exit drops them again, and the template holds them.
    """
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except Exception:
        pass  # her heap stays as it was: forks cost what they did


def _mother(ctl: int) -> tuple[int, int, bool, bytes]:
    """Be the pool's mother: fork a member each time the agent asks (``{"op": "fork"}``, the
    member's control socket attached), never run a program. Returns in each child, with its
    control socket, the heap it is to touch, whether to warm up before it says ready
    (``"warm"``: the template's forked members, which a snapshot should hold warmed) and the
    fault profile its warm-up writes (``"profile"``, see ``pywarm._profile_steps``).

    A refill by a fresh ``python3`` costs ~20 s of guest time here (start-up ~5 s, ``import
    numpy`` ~14 s); a fork of this interpreter, which has done both and has no heap, ~1 s.
    The child is the agent's, not ours (:class:`_Forker`): the agent reaps it like any other
    member, and the mother has nothing to report."""
    try:
        forker = _Forker()
    except OSError as exc:
        _send(ctl, {"ready": False, "error": f"cannot fork members: {exc}"})
        os._exit(1)
    _send(ctl, {"ready": True, "pid": os.getpid(), "mother": True})
    # The agent moves her to the background once she is ready (see pool.BACKGROUND_NICE):
    # her children, and their warm-ups, are born there, and go back to the agent's priority
    # when the agent hands them a job.
    while True:
        try:
            spec, fds = _receive_job(ctl)
        except (EOFError, OSError, ValueError):
            os._exit(0)  # the agent went away or is shutting the pool down
        if spec.get("op") != "fork" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            _send(ctl, {"error": "not a fork request"})
            continue
        try:
            pid = forker.fork()
        except OSError as exc:
            os.close(fds[0])
            _send(ctl, {"error": f"fork: {exc}"})
            continue
        if pid == 0:
            os.close(ctl)
            os.setsid()  # a session and process group of its own, as a started member has
            profile = spec.get("profile")
            return (
                fds[0],
                int(spec.get("heap", 0)),
                spec.get("warm") is True,
                profile if isinstance(profile, bytes) else b"",
            )
        os.close(fds[0])
        _send(ctl, {"pid": pid})


class _Forker:
    """``fork()`` whose child's parent is our parent: ``clone(CLONE_PARENT | SIGCHLD)``.

    The agent can then wait for the child's exit status as for any member it started itself.
    glibc's ``fork()`` cannot set ``CLONE_PARENT``, so the system call is made here and the
    child-side fix-ups ``fork()`` does that matter to a process with one thread are done too:
    the kernel writes the child's thread id into glibc's ``struct pthread`` (``raise()``,
    ``pthread_kill`` and mutex owners read it: left alone it would name the mother), and
    Python's own ``PyOS_BeforeFork``/``PyOS_AfterFork_*`` run as ``os.fork`` runs them, with
    the GIL held throughout (``PyDLL``). With more than one thread, locks another thread holds
    would be copied held: the mother refuses then (numpy's BLAS runs one thread on one vCPU).
    """

    def __init__(self) -> None:
        import ctypes

        if os.uname().machine != "x86_64":
            raise OSError("only on x86_64")
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            raise OSError(f"the mother has {threads} threads, not 1")
        self._ctypes = ctypes
        self._libc = libc = ctypes.PyDLL(None, use_errno=True)
        libc.pthread_self.restype = ctypes.c_void_p
        libc.syscall.restype = ctypes.c_long
        self._tid = libc.pthread_self() + self._tid_offset(libc.pthread_self())

    def _tid_offset(self, thread: int) -> int:
        """Where glibc keeps the thread id in ``struct pthread`` (0x2d0 in every x86_64 glibc
        since 2.25), checked against the kernel's answer rather than trusted."""
        tid = self._libc.syscall(SYS_GETTID)
        read = self._ctypes.c_int.from_address
        if read(thread + TID_OFFSET).value == tid:
            return TID_OFFSET
        hits = [off for off in range(0, 4096, 4) if read(thread + off).value == tid]
        if len(hits) != 1:
            raise OSError("cannot find the thread id in glibc's struct pthread")
        return hits[0]

    def fork(self) -> int:
        ctypes, api = self._ctypes, self._ctypes.pythonapi
        flags = CLONE_PARENT | CLONE_CHILD_SETTID | SIGCHLD
        api.PyOS_BeforeFork()
        pid = self._libc.syscall(
            ctypes.c_long(SYS_CLONE), ctypes.c_ulong(flags), None, None,
            ctypes.c_void_p(self._tid), ctypes.c_ulong(0),
        )  # fmt: skip
        if pid == 0:
            api.PyOS_AfterFork_Child()
            return 0
        errno = ctypes.get_errno()
        api.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(errno, os.strerror(errno))
        return int(pid)

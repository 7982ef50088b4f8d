"""What the parts of a pre-started interpreter share: messages on the control socket,
the reseed of generators seeded in the template, and writes to ``sys.flags``.

A pre-started interpreter runs six files in one namespace, never as modules (an import
would add to the ``sys.modules`` the program finds): ``BOOT`` (:mod:`ember.agent.member`)
executes this one, :mod:`~ember.agent.pymain` (python3's C start-up for a program: streams,
the script read), :mod:`~ember.agent.pyjob` (the job applied, the program run),
:mod:`~ember.agent.pywarm` (warm-ups), :mod:`~ember.agent.pyclone` (the holder and the
mother's forks) and :mod:`~ember.agent.pystart` (start-up and the wait for a job), in that
order. Each names what it takes from the ones before it in imports that run only when it is
imported as a module (by the run_code worker, the tests, the type checker).

Standard library only (it runs in the guest).
"""

from __future__ import annotations

import marshal
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # no run-time import: these files must not add to sys.modules
    from typing import Any


def _read_exact(fd: int, size: int) -> bytes:
    parts = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _send(fd: int, message: dict[str, Any]) -> None:
    data = marshal.dumps(message)
    _write_all(fd, len(data).to_bytes(4, "big") + data)


def _receive_job(ctl: int) -> tuple[dict[str, Any], list[int]]:
    """The job, with the program's pipe ends attached: stdout and stderr, then stdin's, if any."""
    import _socket  # built into python3; dropped from sys.modules at hand-over

    sock = _socket.socket(fileno=ctl)
    try:
        first, ancillary, _, _ = sock.recvmsg(1 << 16, _socket.CMSG_SPACE(3 * 4))
        fds: list[int] = []
        for level, kind, data in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += [
                    int.from_bytes(data[i : i + 4], sys.byteorder)
                    for i in range(0, len(data) - 3, 4)
                ]
        if len(first) < 4 or len(fds) > 3:
            raise EOFError
        size = int.from_bytes(first[:4], "big")
        body = first[4:]
        if len(body) < size:
            body += _read_exact(ctl, size - len(body))
    finally:
        sock.detach()
    message = marshal.loads(body)
    if not isinstance(message, dict):
        raise EOFError
    return message, fds


class _Flags:
    """Writes ``sys.flags`` fields (a read-only struct sequence, stored like a tuple)."""

    def __init__(self) -> None:
        import ctypes

        self._ctypes = ctypes
        self._names = type(sys.flags).__match_args__
        self.works = self._check()

    def _slot(self, index: int) -> Any:
        address = (
            id(sys.flags) + tuple.__basicsize__ + index * self._ctypes.sizeof(self._ctypes.c_void_p)
        )
        return self._ctypes.c_void_p.from_address(address)

    def _check(self) -> bool:
        """Writing a field's own value back must read back the same object (else: no patching,
        and jobs that need a field changed go to real processes)."""
        try:
            index = self._names.index("quiet")
            value = sys.flags[index]
            self._write(index, value)
            return sys.flags.quiet is value and len(sys.flags) == len(self._names)
        except Exception:
            return False

    def _write(self, index: int, value: object) -> None:
        self._ctypes.pythonapi.Py_IncRef(self._ctypes.py_object(value))
        self._slot(index).value = id(value)
        # the old value (0, 1, False, True) is a shared constant: one reference is kept

    def set(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            index = self._names.index(name)
            old = sys.flags[index]
            if old != value or type(old) is not type(value):
                self._write(index, value)


def _reseed(seed: bytes = b"") -> None:
    """Draws made by user-space generators seeded in the template differ in every sibling.

    ``seed``: bytes from the host's entropy in the request that resumed this VM (the run_code
    worker has them), which cost no system call; without them, the kernel's (each
    ``getrandom`` here is ~3,000 emulated guest-kernel instructions). With them, numpy's
    global generator takes 32 bits drawn from the reseeded ``random``: an int seed is
    numpy's cheapest path, while an array seed runs its array and ufunc machinery, whose
    code pages are each a first touch in a restored guest. (``numpy.random.default_rng()``
    seeds itself from the kernel with full entropy.) ``multiprocessing``'s authkey is a keyed
    hash of the seed, never drawn from ``random``, whose outputs a program sees.
    """
    random = sys.modules.get("random")
    if random is not None:
        # 32 bytes, not random.seed()'s 2,496: each 64 bytes of os.urandom is a ChaCha block
        # of emulated kernel code here (~0.6 ms); 256 bits seed a non-crypto generator plenty.
        # Bytes are hashed by random.seed itself (SHA-512).
        random.seed(seed or os.urandom(32))
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        try:
            if seed and random is not None:
                numpy_random.seed(random.getrandbits(32))
            else:
                numpy_random.seed()
        except Exception:
            pass
    tempfile: Any = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile._name_sequence = None
    process: Any = sys.modules.get("multiprocessing.process")
    if process is not None:
        # The main process's authkey, the secret of a program's managers and listeners (its
        # children inherit it), was drawn from os.urandom when the template imported it.
        hashlib: Any = sys.modules.get("hashlib")
        if seed and hashlib is not None:
            key = hashlib.blake2b(seed, digest_size=32, person=b"mp.authkey").digest()
        else:
            key = os.urandom(32)
        process.current_process().authkey = key


def _restart_clocks() -> None:
    """Module state that counts from a program's start starts now: ``logging`` (a preload
    module) measures its records' ``relativeCreated`` from its import, which was in the
    template, minutes or days before this program or session began."""
    logging: Any = sys.modules.get("logging")
    if logging is not None:
        logging._startTime = logging.time.time()  # its own `time`: no import here

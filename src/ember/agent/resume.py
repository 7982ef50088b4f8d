"""What a guest must do first after a restore or a fork: take the host's clock and entropy.

Every sandbox restored from one template starts from the same memory: the same guest-kernel
random state, the same ``random`` state in the warm interpreters, the same wall clock as when
the snapshot was taken (the guest kernel moves ``CLOCK_REALTIME`` on by the time it was not
running, but only as well as it can count host TSC cycles, and a template's clock was never
better than its boot). So the host attaches a ``resume`` object to its first request after each
restore or fork::

    {"realtime_ns": <host CLOCK_REALTIME when sent>, "entropy": "<base64 of 32+ bytes>"}

and the agent applies it before that request is served, so no user code ever runs on the
template's clock or randomness:

* the wall clock is stepped to the host's. With the VMM's clock pair in the shared region
  (``ember.agent.tscclock``) that is the host's clock *now*, read from the TSC, and it is
  stepped when they differ by more than :data:`TSC_STEP_NS`; without one, to the stamp in the
  request when they differ by more than :data:`CLOCK_STEP_NS` (the request took that long to
  arrive: the clock stays behind by its transit, 40-90 ms for a restored guest's first one).
  Later requests leave the clock alone: a program may set it, and a parked or paused guest
  keeps time by the same TSC (time it did not run is counted as sleep, patch ``0005``).
  Ember's kernel takes the pair itself in its first timekeeping update after a restore
  (patch ``0011``), before any user code runs, so this check usually finds nothing to step
  (each step is a ``clock_settime``: 3-20 ms of emulated kernel time under kvm_pvm); it
  remains for other kernels, a fork (its gap is too short to be told from running time) and
  a guest whose clocksource is not the TSC;
* the bytes re-key the kernel's CRNG at once (Ember's ``RNDEMBERREKEY``; on another kernel
  ``RNDADDENTROPY`` + ``RNDRESEEDCRNG``), so ``os.urandom`` differs between siblings from the
  first call;
* the warm interpreters are told to reseed ``random`` before their next job
  (:attr:`ResumeState.generation`). A running interpreter's ``hash()`` secret cannot be changed:
  ``hash('abc')`` stays the template's in the warm ``run_code`` worker (documented).

Runs in the guest: standard library only.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ember.agent.common import BadRequest, log
from ember.agent.tscclock import TscClock, region_pair

__all__ = ["CLOCK_STEP_NS", "TSC_STEP_NS", "ResumeState", "apply_resume"]

#: linux/random.h ioctls on /dev/random (all need CAP_SYS_ADMIN; the agent is root).
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2]) + the buffer: struct rand_pool_info
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
RNDEMBERREKEY = 0x4020527E  # _IOW('R', 0x7e, __u8[32]): Ember's kernel patch 0008
REKEY_BYTES = 32

CLOCK_STEP_NS = 50_000_000
TSC_STEP_NS = 1_000_000  # the pair is good to microseconds: a millisecond off is drift
SETTLED_NS = 50_000  # a stepped clock this close to the pair's is done (see _step_to_pair)
MAX_LAG_NS = 20_000_000  # a step's own lag past this was a preemption, not the lag
MAX_STEPS = 5
MAX_ENTROPY = 512  # bytes taken from one resume; the host sends 32
JOB_SEED_PERSON = b"ember-job-seed"  # BLAKE2b's personalisation: these seeds, no others


@dataclass
class ResumeState:
    """What the agent has applied; warm interpreters compare ``generation`` with their own."""

    generation: int = 0
    clock_steps: int = 0
    entropy_bytes: int = 0
    reseeds: int = 0
    rekeys: int = 0  # of the reseeds, those done in one step (RNDEMBERREKEY)
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    random_fd: int | None = field(default=None, repr=False)
    clock: TscClock | None = field(default=None, repr=False)
    seed_key: bytes = field(default=b"", repr=False)  # the last resume's entropy, hashed
    seeds: int = field(default=0, repr=False)  # job seeds drawn from it

    def open_random(self) -> None:
        """Open ``/dev/random`` now, in the template: a path lookup costs a restored guest
        several ms of emulated kernel time, an fd carried over in the snapshot nothing."""
        if self.random_fd is None:
            try:
                self.random_fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"

    def warm(self) -> None:
        """Everything a resume needs, done once in the template: ``/dev/random`` opened,
        base64's validating regex compiled, and the rest of the path run once, so that its
        code is mapped in this process (tens of ms of fresh pages in a restored guest; the
        first request of a restored sandbox took two page faults here, ~3,000 emulated
        instructions each with the kernel's fault-around, before this ran the path)."""
        self.open_random()
        base64.b64decode(b"AAAA", validate=True)
        if self.clock is None:
            self.clock = TscClock(region_pair)  # its code page mapped and called once here
            self.clock.realtime_ns()
        # The clock read against the pair (a step here is harmless: a restore takes the
        # host's clock again) and a re-key with zeros, which leaves the key as it is. Not the
        # fallback of another kernel: it would credit the zeros as entropy.
        _step_clock(None, self.clock)
        if self.random_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.random_fd, RNDEMBERREKEY, bytes(REKEY_BYTES))
        hashlib.blake2b(b"", key=bytes(REKEY_BYTES), person=JOB_SEED_PERSON).digest()

    def job_seed(self) -> str:
        """32 bytes (hex) to seed one pooled program's ``random`` and numpy after a resume:
        BLAKE2b of a counter, keyed by the host's entropy of the last resume, so every
        program and every sibling gets its own. ``""`` before any resume (the program asks
        the kernel). In user space: a ``getrandom`` in the program costs ~3,800 emulated
        instructions after a resume (three ChaCha blocks: the CPU's re-key, the key erasure,
        the output), and numpy's own seeding one more call."""
        with self.lock:
            if not self.seed_key:
                return ""
            self.seeds += 1
            counter, key = self.seeds.to_bytes(8, "little"), self.seed_key
        return hashlib.blake2b(counter, key=key, person=JOB_SEED_PERSON, digest_size=32).hexdigest()

    def snapshot(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "clock_steps": self.clock_steps,
            "entropy_bytes": self.entropy_bytes,
            "reseeds": self.reseeds,
            "rekeys": self.rekeys,
            "last_error": self.last_error,
        }


def _step_clock(host_ns: int | None, clock: TscClock | None) -> bool:
    """Step the wall clock to the host's: from the TSC pair if there is one, else to
    ``host_ns`` (a stamp as old as the request's transit). False if it was close enough."""
    stepped = _step_to_pair(clock) if clock is not None else None
    if stepped is not None:
        return stepped
    return host_ns is not None and _step_to_stamp(host_ns)


def _step_to_stamp(host_ns: int) -> bool:
    if abs(time.clock_gettime_ns(time.CLOCK_REALTIME) - host_ns) <= CLOCK_STEP_NS:
        return False
    time.clock_settime_ns(time.CLOCK_REALTIME, host_ns)
    return True


def _step_to_pair(clock: TscClock) -> bool | None:
    """Step to the host's clock now, read from the TSC; ``None`` without a pair.

    The kernel sets the value a system call's entry after it was read here (emulated under
    kvm_pvm: ~1 ms, measured; 3-4 ms on a busy host), so the clock lags by that much after a
    step. It is read back and stepped again ahead by the lag seen so far, until it is within
    :data:`SETTLED_NS`. A step the vCPU was preempted in shows a lag past :data:`MAX_LAG_NS`:
    it is retried, and its lag not learnt.
    """
    before = clock.realtime_ns()
    if before is None:
        return None
    guest = time.clock_gettime_ns(time.CLOCK_REALTIME)
    after = clock.realtime_ns()
    # Bracketed: a restored guest's first reading can take over a millisecond (a page to
    # fault back), and a clock the kernel already set (patch 0011) must not look off by it.
    if after is not None and before - TSC_STEP_NS <= guest <= after + TSC_STEP_NS:
        return False
    lag = 0
    for _ in range(MAX_STEPS):
        target = clock.realtime_ns()
        if target is None:
            break
        time.clock_settime_ns(time.CLOCK_REALTIME, target + lag)
        now = clock.realtime_ns()
        if now is None:
            break
        behind = now - time.clock_gettime_ns(time.CLOCK_REALTIME)
        if abs(behind) <= SETTLED_NS:
            break
        if abs(lag + behind) < MAX_LAG_NS:
            lag += behind
    return True


_rekey_missing = False  # this kernel answered RNDEMBERREKEY with EINVAL once: not patched


def _add_entropy(fd: int, data: bytes) -> bool:
    """Make the kernel's CRNG draw on ``data`` now; True if it took the one-step re-key.

    The re-key is not optional: the guest's CRNG reseeds itself by jiffies (every 60 s), and a
    restore no longer moves jiffies on by the template's age, so without it siblings would draw
    the same bytes from ``os.urandom`` until then. Ember's kernel (patch ``0008``) XORs the
    bytes into the CRNG key, 32 at a time, starts a new generation and mixes them into the
    input pool, in one system call per 32 bytes (with it, the whole first request of a restored
    sandbox measured ~11,000 emulated instructions: ``bench/first_call.py``). A kernel without
    it gets them credited to its pool and reseeds from it (``RNDADDENTROPY`` +
    ``RNDRESEEDCRNG``: ~13,000 emulated instructions of BLAKE2s, ~15 ms in the first request of
    every restored sandbox).
    """
    global _rekey_missing
    if not _rekey_missing:
        try:
            for start in range(0, len(data), REKEY_BYTES):
                chunk = data[start : start + REKEY_BYTES]
                fcntl.ioctl(fd, RNDEMBERREKEY, chunk.ljust(REKEY_BYTES, b"\0"))  # XOR 0: no-op
            return True
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not Ember's kernel
                _rekey_missing = True
            elif exc.errno != errno.ENODATA:  # (a CRNG not ready yet: credit the bytes)
                raise
    info = struct.pack("ii", len(data) * 8, len(data)) + data
    fcntl.ioctl(fd, RNDADDENTROPY, info)
    fcntl.ioctl(fd, RNDRESEEDCRNG)
    return False


def apply_resume(state: ResumeState, resume: object) -> bytes:
    """Apply a ``resume`` object from the host; a malformed one is a :class:`BadRequest`.

    Returns the entropy it carried (empty if none), so a process that applies it can seed
    its own generators from it without asking the kernel again.
    """
    if not isinstance(resume, dict):
        raise BadRequest("resume must be an object")
    host_ns = resume.get("realtime_ns")
    entropy = resume.get("entropy")
    if host_ns is not None and (type(host_ns) is not int or not 0 < host_ns < 1 << 63):
        raise BadRequest("resume.realtime_ns must be a positive integer")
    if entropy is not None and not isinstance(entropy, str):
        raise BadRequest("resume.entropy must be base64 text")
    data = b""
    if entropy:
        if len(entropy) > MAX_ENTROPY * 4 // 3 + 4:
            raise BadRequest(f"resume.entropy is over {MAX_ENTROPY} bytes")
        try:
            data = base64.b64decode(entropy, validate=True)
        except ValueError as exc:
            raise BadRequest(f"resume.entropy is not base64: {exc}") from None
    with state.lock:
        state.generation += 1
        if data:  # a key of BLAKE2b's size at most, whatever the host sent
            state.seed_key = data if len(data) <= 64 else hashlib.blake2b(data).digest()
        try:
            if _step_clock(host_ns, state.clock):
                state.clock_steps += 1
            if data:
                state.open_random()
                if state.random_fd is None:
                    raise OSError(f"/dev/random cannot be opened ({state.last_error})")
                rekeyed = _add_entropy(state.random_fd, data)
                state.entropy_bytes += len(data)
                state.reseeds += 1
                state.rekeys += rekeyed
        except OSError as exc:  # not root (tests on a host): say so, serve the request anyway
            state.last_error = f"{type(exc).__name__}: {exc}"
            log(f"resume: {state.last_error}")
    return data

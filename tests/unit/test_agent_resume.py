"""The agent's restore hook (``resume`` on the first request after a restore or fork).

The clock and the kernel's entropy pool are the host's here, so both are replaced by recorders:
a unit test must never step the host's clock.
"""

from __future__ import annotations

import base64
import errno
import os
import struct
import sys
import time
import types

import pytest

from ember.agent import resume as resume_mod
from ember.agent.common import BadRequest
from ember.agent.pybase import _reseed
from ember.agent.pyjob import _reset_tzpath
from ember.agent.resume import CLOCK_STEP_NS, ResumeState, apply_resume
from ember.agent.worker import Worker


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[object]]:
    calls: dict[str, list[object]] = {"settime": [], "entropy": []}
    monkeypatch.setattr(
        resume_mod.time, "clock_settime_ns", lambda clock, ns: calls["settime"].append(ns)
    )

    def add_entropy(fd: int, data: bytes) -> bool:
        calls["entropy"].append(data)
        return True  # as Ember's kernel: re-keyed in one step

    monkeypatch.setattr(resume_mod, "_add_entropy", add_entropy)
    return calls


def test_a_far_clock_is_stepped_and_entropy_added(recorded: dict[str, list[object]]) -> None:
    state = ResumeState()
    host_ns = time.clock_gettime_ns(time.CLOCK_REALTIME) + 3_600 * 10**9
    seed = bytes(range(32))
    apply_resume(state, {"realtime_ns": host_ns, "entropy": base64.b64encode(seed).decode()})
    assert recorded["settime"] == [host_ns]
    assert recorded["entropy"] == [seed]
    assert (state.generation, state.clock_steps, state.entropy_bytes) == (1, 1, 32)
    assert (state.reseeds, state.rekeys) == (1, 1)


def test_a_near_clock_is_left_alone(recorded: dict[str, list[object]]) -> None:
    state = ResumeState()
    near = time.clock_gettime_ns(time.CLOCK_REALTIME) + CLOCK_STEP_NS // 10
    apply_resume(state, {"realtime_ns": near})
    assert recorded["settime"] == [] and state.generation == 1 and state.clock_steps == 0


@pytest.mark.parametrize(
    "bad",
    [
        "now",
        {"realtime_ns": -1},
        {"realtime_ns": 1.5},
        {"realtime_ns": True},
        {"realtime_ns": 1 << 70},
        {"entropy": 5},
        {"entropy": "not base64!"},
        {"entropy": "A" * 4096},
    ],
)
def test_malformed_resume_is_a_bad_request(recorded: dict[str, list[object]], bad: object) -> None:
    state = ResumeState()
    with pytest.raises(BadRequest):
        apply_resume(state, bad)
    assert state.generation == 0 and recorded == {"settime": [], "entropy": []}


def test_an_os_error_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, data: bytes) -> None:
        raise PermissionError("not root")

    monkeypatch.setattr(resume_mod, "_add_entropy", refuse)
    state = ResumeState()
    apply_resume(state, {"entropy": base64.b64encode(b"x" * 32).decode()})
    assert state.generation == 1 and "not root" in state.last_error


def test_the_worker_reseeds_random_once_per_generation() -> None:
    worker = Worker()
    worker.run("import random\nrandom.seed(7)")
    template_draw = worker.run("random.random()")["value"]
    worker.run("random.seed(7)")
    worker.reseed(1)  # a restore: the template's seed must not survive it
    assert worker.run("random.random()")["value"] != template_draw
    worker.run("random.seed(7)")
    worker.reseed(1)  # the same generation again: nothing to do
    assert worker.run("random.random()")["value"] == template_draw


def test_apply_resume_hands_back_the_entropy_it_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resume_mod, "_add_entropy", lambda fd, data: True)
    monkeypatch.setattr(ResumeState, "open_random", lambda self: setattr(self, "random_fd", 99))
    state = ResumeState()
    assert apply_resume(state, {"entropy": base64.b64encode(b"e" * 32).decode()}) == b"e" * 32
    assert apply_resume(state, {}) == b""


class FakeNumpyRandom(types.ModuleType):
    """``numpy.random`` as far as the reseed uses it: its legacy global ``seed``."""

    def __init__(self) -> None:
        super().__init__("numpy.random")
        self.seeds: list[object] = []

    def seed(self, seed: object = None) -> None:
        self.seeds.append(seed)


def test_the_worker_seeds_from_the_resumes_entropy_without_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The code ring's first request carries the host's entropy: the worker derives its
    generators' seeds from it, with no ``getrandom`` (emulated kernel work) on the way."""
    numpy_random = FakeNumpyRandom()
    monkeypatch.setitem(sys.modules, "numpy.random", numpy_random)
    draws = []
    for entropy in (b"a" * 32, b"a" * 32, b"b" * 32):
        worker = Worker()
        worker.run("import random\nrandom.seed(7)")
        with monkeypatch.context() as patched:
            patched.setattr(os, "urandom", lambda n: pytest.fail("the kernel was asked"))
            worker.reseed(1, entropy)
        draws.append(worker.run("random.random()")["value"])
    assert draws[0] == draws[1] != draws[2]  # the seed is the entropy's, and only its
    seeds = numpy_random.seeds  # an int (numpy's cheap path), drawn from the new random
    assert len(seeds) == 3 and seeds[0] == seeds[1] != seeds[2]
    assert all(isinstance(s, int) and 0 <= s < 1 << 32 for s in seeds)


def test_without_entropy_the_worker_reseeds_from_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    numpy_random = FakeNumpyRandom()
    monkeypatch.setitem(sys.modules, "numpy.random", numpy_random)
    monkeypatch.delitem(sys.modules, "multiprocessing.process", raising=False)  # its own draw
    asked: list[int] = []
    real = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: asked.append(n) or real(n))
    Worker().reseed(1)
    assert asked == [32] and numpy_random.seeds == [None]  # numpy takes its own from the OS


class FakeProcess:
    """``multiprocessing.current_process()`` as far as the reseed uses it."""

    authkey = b"drawn in the template"


def test_multiprocessing_authkey_is_each_programs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawn at import in the template: replaced at each reseed, derived from the job's seed
    without the kernel, and from the kernel when there is no seed."""
    process = FakeProcess()
    module = types.ModuleType("multiprocessing.process")
    module.current_process = lambda: process  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "multiprocessing.process", module)
    monkeypatch.setitem(sys.modules, "numpy.random", FakeNumpyRandom())
    keys = []
    for seed in (b"a" * 32, b"a" * 32, b"b" * 32):
        with monkeypatch.context() as patched:
            patched.setattr(os, "urandom", lambda n: pytest.fail("the kernel was asked"))
            _reseed(seed)
        keys.append(process.authkey)
    assert keys[0] == keys[1] != keys[2] and {len(k) for k in keys} == {32}, keys
    import random

    random.seed(b"a" * 32)
    assert random.randbytes(32) != keys[0]  # not a draw a program could reproduce
    _reseed()
    assert process.authkey not in (*keys, FakeProcess.authkey) and len(process.authkey) == 32


def test_zoneinfo_reads_its_path_again_without_warning_all_programs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import warnings
    import zoneinfo

    monkeypatch.setenv("PYTHONTZPATH", "/opt/zones:relative/zones")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _reset_tzpath(zoneinfo)
        assert zoneinfo.TZPATH == ("/opt/zones",) and caught == []
    finally:
        monkeypatch.delenv("PYTHONTZPATH")
        zoneinfo.reset_tzpath()
    assert "/opt/zones" not in zoneinfo.TZPATH


class FakeRandom:
    """``fcntl.ioctl`` on /dev/random as a kernel would answer it: with or without Ember's
    one-step re-key (patch 0008), or refusing it as a CRNG that is not ready yet."""

    def __init__(self, rekey_errno: int | None) -> None:
        self.rekey_errno = rekey_errno
        self.calls: list[tuple[int, bytes | None]] = []

    def ioctl(self, fd: int, request: int, arg: bytes | int = 0) -> bytes | int:
        self.calls.append((request, arg if isinstance(arg, bytes) else None))
        if request == resume_mod.RNDEMBERREKEY and self.rekey_errno is not None:
            raise OSError(self.rekey_errno, "refused")
        return arg


def _kernel(monkeypatch: pytest.MonkeyPatch, rekey_errno: int | None) -> FakeRandom:
    fake = FakeRandom(rekey_errno)
    monkeypatch.setattr(resume_mod.fcntl, "ioctl", fake.ioctl)
    monkeypatch.setattr(resume_mod, "_rekey_missing", False)
    return fake


def test_ember_kernels_are_rekeyed_in_one_step_per_32_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _kernel(monkeypatch, None)
    seed = bytes(range(1, 41))
    assert resume_mod._add_entropy(3, seed) is True
    assert fake.calls == [
        (resume_mod.RNDEMBERREKEY, seed[:32]),
        (resume_mod.RNDEMBERREKEY, seed[32:] + bytes(24)),  # zero padding XORs nothing in
    ]


def test_another_kernel_gets_credited_entropy_and_a_reseed_and_is_not_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _kernel(monkeypatch, errno.EINVAL)
    seed = bytes(range(32))
    for _ in range(2):
        assert resume_mod._add_entropy(3, seed) is False
    added = struct.pack("ii", 256, 32) + seed
    fallback = [(resume_mod.RNDADDENTROPY, added), (resume_mod.RNDRESEEDCRNG, None)]
    assert fake.calls == [(resume_mod.RNDEMBERREKEY, seed), *fallback, *fallback]


def test_a_crng_not_ready_is_credited_and_the_rekey_tried_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _kernel(monkeypatch, errno.ENODATA)
    resume_mod._add_entropy(3, bytes(32))
    fake.rekey_errno = None
    assert resume_mod._add_entropy(3, bytes(32)) is True
    assert [request for request, _ in fake.calls] == [
        resume_mod.RNDEMBERREKEY,
        resume_mod.RNDADDENTROPY,
        resume_mod.RNDRESEEDCRNG,
        resume_mod.RNDEMBERREKEY,
    ]


def test_a_refused_rekey_is_an_error_not_a_silent_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _kernel(monkeypatch, errno.EPERM)
    with pytest.raises(PermissionError):
        resume_mod._add_entropy(3, bytes(32))
    assert len(fake.calls) == 1


@pytest.mark.parametrize("rekey_errno", [None, errno.EINVAL])
def test_warm_runs_the_rekey_path_with_zeros_and_never_credits_them(
    monkeypatch: pytest.MonkeyPatch, rekey_errno: int | None
) -> None:
    """The template maps a resume's code by running it once: a re-key with zeros leaves
    Ember's key as it is, and on another kernel nothing is credited (zeros are no entropy)."""
    fake = _kernel(monkeypatch, rekey_errno)
    monkeypatch.setattr(ResumeState, "open_random", lambda self: setattr(self, "random_fd", 7))
    monkeypatch.setattr(resume_mod, "TscClock", lambda pair: _NoPair())
    ResumeState().warm()
    assert fake.calls == [(resume_mod.RNDEMBERREKEY, bytes(resume_mod.REKEY_BYTES))]
    assert resume_mod._rekey_missing is False  # a real resume still tries the re-key first


class _NoPair:
    """A TSC clock without the VMM's pair: nothing to step to."""

    def realtime_ns(self) -> int | None:
        return None


def test_job_seeds_come_from_the_resumes_entropy_one_per_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resume_mod, "_add_entropy", lambda fd, data: True)
    monkeypatch.setattr(ResumeState, "open_random", lambda self: setattr(self, "random_fd", 9))
    state, other = ResumeState(), ResumeState()
    assert state.job_seed() == ""  # no resume yet: the program asks the kernel
    for st, entropy in ((state, bytes(range(32))), (other, bytes(range(1, 33)))):
        apply_resume(st, {"entropy": base64.b64encode(entropy).decode()})
    seeds = [state.job_seed() for _ in range(3)]
    assert len(set(seeds)) == 3 and all(len(bytes.fromhex(s)) == 32 for s in seeds)
    assert other.job_seed() != seeds[0]  # a sibling's differ from the first
    big = ResumeState()
    apply_resume(big, {"entropy": base64.b64encode(bytes(300)).decode()})  # > BLAKE2b's key
    assert len(big.seed_key) == 64 and big.job_seed()


def test_a_member_takes_only_a_well_formed_seed() -> None:
    from ember.agent.pyjob import _seed_of

    good = "ab" * 32
    assert _seed_of({"seed": good}) == bytes.fromhex(good)
    for bad in (None, "", "ab" * 31, "zz" * 32, 7):
        assert _seed_of({"seed": bad}) == b""

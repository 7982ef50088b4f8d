"""The pool's fault profile: which pages a forked member's first program writes, learned once
by a probe so that every other forked member writes them while it waits.

Every page a member the mother forked writes first is still hers: a guest copy-on-write
fault, ~3 ms here, in the program's own time. A forked member's first ``python3 -c
'print(1)'`` took ~0.6 s against ~0.2 s for a started member: ~90 faults in the hand-over,
~7 in the program and ~210 ms in the ending (``pyjob.Job.end``), none of which the warm-up's
guesses (throwaway programs, a rehearsal) had reached. The pages are the same in every
child of one mother, at the same addresses: so the pool's first fill forks one more member,
the *probe*, hands it :data:`~ember.agent.pywarm.PROBE_PROGRAM` as a real job (the same
hand-over, program and ending as any exec), and the probe reports on its stderr, last, the
pages it wrote (``pywarm._written_pages``, from ``/proc/self/pagemap``). The agent passes
that list with each fork request; the child writes those pages back unchanged in its
warm-up (``pywarm._profile_steps``): before ``ready`` in the template, in steps between
looks for a job in a live refill.

The list is a hint: the member checks every address against its own mappings, and a probe
that fails, says something else or nothing (a kernel without pagemap) leaves the pool as it
was, warmed by the old steps. Runs in the guest: standard library only.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from typing import Any

from ember.agent.common import log
from ember.agent.member import Member, discard, send_message
from ember.agent.pywarm import PROBE_PROGRAM, PROFILE_MAX_PAGES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ember.agent.pyfind import PythonFinder

__all__ = ["PROBE_TIMEOUT_S", "probe_spec", "run_probe", "valid_profile"]

PROBE_TIMEOUT_S = 120.0  # running time of its program here: ~1 s; one not done by then is broken
MAX_PROFILE_BYTES = PROFILE_MAX_PAGES * 8  # a member reads no more of a profile


def valid_profile(data: bytes) -> bool:
    """A page list as ``pywarm._written_pages`` makes it: whole 8-byte addresses, not too many."""
    return 0 < len(data) <= MAX_PROFILE_BYTES and len(data) % 8 == 0


def probe_spec(
    finder: PythonFinder, ctype: str, pool_env: dict[str, str], generation: int
) -> dict[str, Any] | None:
    """The probe's job, as an exec of ``python3 -c PROBE_PROGRAM`` would be handed over, with a
    seed as a restored sandbox's jobs carry (``ResumeState.job_seed``): the probe's reseed
    then takes their path, and writes their pages. None if no such exec could be pooled."""
    from ember.agent.execute import default_env
    from ember.agent.handover import job_spec
    from ember.agent.pyargs import plan

    env = default_env()
    job = plan(["python3", "-c", PROBE_PROGRAM], env, pool_ctype=ctype, pool_env=pool_env)
    executable = finder.interpreter("python3", env, None)
    if job is None or executable is None:
        return None
    seed = os.urandom(32).hex()
    return {**job_spec(job, env, None, executable, False, generation, seed), "profile": True}


def run_probe(member: Member, spec: dict[str, Any]) -> bytes:
    """Hand ``spec`` (a ``profile`` job) to ``member``, a member just forked for it; its
    fault profile, or ``b""`` if it failed in any way (logged). The member is used up:
    reaped, its holder killed (freeing its memory is the first fill's work)."""
    stdin_w, stdout_r, stderr_r = member.ours
    _, stdout_w, stderr_w = member.theirs
    try:
        send_message(member.ctl, spec, (stdout_w, stderr_w))
    except OSError as exc:
        log(f"interpreter pool: the probe could not take its job: {exc}")
        discard(member)
        return b""
    member.close_fds(theirs_only=True)
    os.close(stdin_w)
    member.theirs = (-1, -1, -1)
    err, done = _drain(stdout_r, stderr_r, time.monotonic() + PROBE_TIMEOUT_S)
    status = None
    if done:
        try:
            status = member.proc.wait(PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    for fd in (stdout_r, stderr_r):
        os.close(fd)
    member.ours = (-1, -1, -1)
    discard(member)  # closes the rest, kills a probe still running, and its holder
    if status != 0 or not valid_profile(err):
        said = err[-200:].decode("utf-8", "replace").strip() if not valid_profile(err) else ""
        log(f"interpreter pool: no fault profile (probe status {status}, {len(err)} bytes"
            f"{': ' + said if said else ''}): forked members warm up without one")  # fmt: skip
        return b""
    return err


def _drain(stdout_r: int, stderr_r: int, deadline: float) -> tuple[bytes, bool]:
    """Both pipes read to their end, or until ``deadline`` (then ``done`` is False); what is
    kept is stderr, up to a profile's size and a bit (more is not one). Stdout is read only
    so that the program never blocks on it (its one line)."""
    poller = select.poll()
    for fd in (stdout_r, stderr_r):
        poller.register(fd, select.POLLIN)
    open_fds = {stdout_r, stderr_r}
    err = bytearray()
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(err), False
        for fd, _ in poller.poll(left * 1000):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
            elif fd == stderr_r:
                err += chunk[: max(0, MAX_PROFILE_BYTES + 8 - len(err))]
    return bytes(err), True

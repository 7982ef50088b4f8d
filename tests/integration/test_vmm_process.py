"""Both ways a sandbox's VMM process starts, end to end, with the typed config handed over.

A restore is forked by the zygote, which received the config as JSON over its socket; a cold
boot (``boot=True``, and every template build) is a fresh ``python -m ember.vmm.process``
that read it on stdin.  Neither passes a flag: the process's command line says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ember.sandbox import Sandbox
from ember.zygote import Zygote
from tests.integration.conftest import Images
from tests.waiting import alive, wait_for


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")


def test_a_restore_is_forked_by_the_zygote(images: Images) -> None:
    with Sandbox() as sb:
        vmm = sb._vmm.vmm_pid
        assert vmm is not None
        assert _parent(vmm) == Zygote.get()._proc.pid
        assert b"ember.zygote" in b" ".join(_cmdline(vmm))  # a fork: no command line of its own
        assert sb.exec(["echo", "restored"], timeout=120).stdout == b"restored\n"


def test_a_cold_boot_is_a_fresh_interpreter_reading_its_config_on_stdin(images: Images) -> None:
    with Sandbox(boot=True) as sb:
        proc = sb._vmm.proc
        assert proc is not None
        assert _cmdline(proc.pid)[1:] == [b"-m", b"ember.vmm.process"]
        assert os.readlink(f"/proc/{proc.pid}/fd/0") == "/dev/null"  # the config was read
        assert sb.exec(["echo", "booted"], timeout=300).stdout == b"booted\n"


ABANDON = """
import os, signal, sys
from ember import Sandbox
from ember.zygote import Zygote
sb = Sandbox()
print(sb._vmm.vmm_pid, sb._vmm.dir, flush=True)
if sys.argv[1] == "kill-zygote":  # no clean-up by the zygote: the death signal alone
    os.kill(Zygote.get()._proc.pid, signal.SIGKILL)
sys.stdin.read()  # until the test lets this process end, sandbox still open
"""


@contextlib.contextmanager
def abandoning(how: str) -> Iterator[tuple[subprocess.Popen[bytes], int, str]]:
    """A process running ABANDON ``how``, its VMM's pid and its sandbox directory; after the
    test, the process ended and anything of its sandbox still there removed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    owner = subprocess.Popen(
        [sys.executable, "-c", ABANDON, how],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert owner.stdout is not None and owner.stdin is not None
    pid_text, directory = owner.stdout.readline().decode().split()
    vmm = int(pid_text)
    try:
        yield owner, vmm, directory
    finally:
        if not owner.stdin.closed:
            owner.stdin.close()
        owner.wait(timeout=60)
        if alive(vmm):
            os.kill(vmm, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)


def test_a_vmm_dies_with_its_zygote_killed_outright(images: Images) -> None:
    """The jail's change of uid clears the parent-death signal; it is armed again."""
    with abandoning("kill-zygote") as (_owner, vmm, _directory):
        wait_for(lambda: not alive(vmm), 30, "the VMM to die with its killed zygote")


def test_a_vmm_dies_with_the_process_that_made_it_even_unclosed(images: Images) -> None:
    """A script that ends (or crashes) without close() leaves no VMM running and no sandbox
    directory: its zygote kills and cleans what is left."""
    with abandoning("end") as (owner, vmm, directory):
        assert alive(vmm)
        assert owner.stdin is not None
        owner.stdin.close()  # the script ends without closing its sandbox
        assert owner.wait(timeout=60) == 0
        wait_for(lambda: not alive(vmm), 30, "the abandoned VMM to die with its zygote")
        wait_for(lambda: not os.path.exists(directory), 30, "its directory to be removed")


RUN_OUT = """
import resource, sys
from ember import Sandbox
from ember.errors import SandboxError
Sandbox().close()  # the zygote and the template warm
live = []
resource.setrlimit(resource.RLIMIT_NOFILE, (len(__import__("os").listdir("/proc/self/fd")) + 60,
                   resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    while len(live) < 60:
        sb = Sandbox()
        try:
            sb.ping()
        except SandboxError:
            sb.close()
            raise
        live.append(sb)
except SandboxError as exc:
    print("refused after", len(live), "|", exc, flush=True)
outcomes = []  # at the limit, a call that needs a new connection gets the same clear error
for sb in live:
    try:
        outcomes.append("pong" if sb.ping()["pong"] else "no")
    except SandboxError as exc:
        outcomes.append("limit" if "RLIMIT_NOFILE" in str(exc) else repr(exc))
print("at the limit", *outcomes, flush=True)
live.pop().close()  # one sandbox's descriptors back: the others must all answer now
answers = [sb.ping()["pong"] for sb in live]
print("answered", sum(answers), "of", len(live), flush=True)
pids = [sb._vmm.vmm_pid for sb in live]
for sb in live:
    sb.close()
print("pids", *pids, flush=True)
"""


def test_running_out_of_descriptors_is_a_clear_error_and_the_others_keep_answering(
    images: Images,
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", RUN_OUT], capture_output=True, text=True, env=env, timeout=600
    )
    said = f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    assert out.returncode == 0, said
    lines = out.stdout.splitlines()
    refused = next((line for line in lines if line.startswith("refused after")), "")
    assert "RLIMIT_NOFILE" in refused and "file descriptors" in refused, said
    made = int(refused.split()[2])
    assert 1 < made < 60, said
    at_limit = next(line for line in lines if line.startswith("at the limit")).split()[3:]
    assert len(at_limit) == made and set(at_limit) <= {"pong", "limit"}, said
    assert f"answered {made - 1} of {made - 1}" in lines, said
    pids = [int(p) for p in lines[-1].split()[1:]]
    wait_for(lambda: not any(alive(p) for p in pids), 30, "the closed sandboxes' VMMs to end")


BOOT_AND_WAIT = """
from ember import Sandbox
Sandbox(boot=True)  # a cold boot takes minutes here: the test kills this process meanwhile
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if _parent(int(entry)) == pid:
                    found.append(int(entry))
    return found


def test_a_cold_boots_vmm_stops_when_its_launcher_is_killed_outright(images: Images) -> None:
    """No finally runs on SIGKILL, and a cold boot's VMM has no death signal (its own session,
    forked by the launcher's thread): the owner pipe's end of file stops it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    owner = subprocess.Popen([sys.executable, "-c", BOOT_AND_WAIT], env=env)
    vmms: list[int] = []

    def started() -> bool:
        vmms[:] = [
            p for p in _children(owner.pid) if _cmdline(p)[1:] == [b"-m", b"ember.vmm.process"]
        ]
        return bool(vmms)

    directory = ""
    try:
        wait_for(started, 60, "the cold boot's VMM to start")
        wait_for(lambda: os.path.exists(f"/proc/{vmms[0]}/fd/1"), 10, "its console")
        directory = os.path.dirname(os.readlink(f"/proc/{vmms[0]}/fd/1"))
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
        wait_for(lambda: not alive(vmms[0]), 30, "the VMM to stop without its launcher")
    finally:
        if owner.poll() is None:
            owner.kill()
        for vmm in vmms:
            if alive(vmm):
                os.kill(vmm, signal.SIGKILL)
        if directory.startswith(tempfile.gettempdir()):
            shutil.rmtree(directory, ignore_errors=True)

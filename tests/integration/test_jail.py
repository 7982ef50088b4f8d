"""The jail end to end: namespaces, chroot, uid, seccomp, quotas and crash isolation.

These run as root (CI does): the jail needs it, and an unjailed run would
prove nothing, so a non-root run fails here instead of skipping.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import templates
from ember.errors import SandboxCrashed, SandboxTimeout
from ember.jailer.jail import JAIL_ID_BASE
from ember.launcher import VmmProcess
from ember.sandbox import Sandbox
from ember.spec import DEFAULT_MEM_MIB, SandboxSpec
from ember.vmm import control
from tests.integration.conftest import Images, ember
from tests.waiting import wait_for


@pytest.fixture(scope="module", autouse=True)
def as_root(images: Images) -> None:
    if os.geteuid() != 0:
        pytest.fail("the jail tests need root (the jail itself does)")


@pytest.fixture
def hooked() -> Iterator[Sandbox]:
    """A jailed sandbox whose VMM answers the debug ops (what a compromised VMM could try)."""
    spec = SandboxSpec(jail=True)
    vmm = VmmProcess(spec, restore=templates.find(spec=spec).dir, debug_hooks=True)
    sb = Sandbox.__new__(Sandbox)
    sb._setup(vmm, spec)
    yield sb
    sb.close()


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _filtered(task: Path) -> bool:
    try:
        return (task / "status").read_text().count("Seccomp:\t2") == 1
    except OSError:
        return True  # a thread that has ended since


def test_the_vmm_runs_jailed(images: Images) -> None:
    with Sandbox() as sb:
        pid = sb._vmm.vmm_pid
        assert pid is not None
        assert _status(pid)["NSpid"].split()[-1] == "1"  # PID 1 of its own PID namespace
        uid = int(_status(pid)["Uid"].split()[0])
        assert uid == JAIL_ID_BASE + pid  # its pid as the host sees it, not 1
        assert _status(pid)["Groups"] == ""
        for ns in ("mnt", "net", "ipc", "uts", "pid"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        assert os.readlink(f"/proc/{pid}/root") == str(sb._vmm.dir)
        # Ready comes before the threads start (each is confined before it serves a request
        # or runs the guest): once the guest has answered, every one of them is filtered.
        assert sb.ping()["pong"]
        wait_for(lambda: all(_filtered(t) for t in Path(f"/proc/{pid}/task").iterdir()),
                 30, "every VMM thread under its seccomp filter")  # fmt: skip
        assert len(list(Path(f"/proc/{pid}/task").iterdir())) >= 3  # main, events, vCPU
        assert _status(pid)["NoNewPrivs"] == "1"
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert "Max core file size        0" in limits
        assert Path(f"/proc/{pid}/environ").read_bytes().strip(b"\0") == b""  # scrubbed
        assert sb.exec(["echo", "jailed"], timeout=120).stdout == b"jailed\n"


def test_two_live_vmms_run_as_different_users(images: Images) -> None:
    """Both VMMs are PID 1 of their own namespaces; their uids (and gids) still differ."""
    with Sandbox() as first, Sandbox() as second:
        ids = []
        for sb in (first, second):
            pid = sb._vmm.vmm_pid
            assert pid is not None
            status = _status(pid)
            assert status["NSpid"].split()[-1] == "1"
            uids, gids = set(status["Uid"].split()), set(status["Gid"].split())
            assert len(uids) == len(gids) == 1  # real, effective, saved, file system alike
            ids.append((int(uids.pop()), int(gids.pop())))
        assert ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]
        for sb in (first, second):
            assert sb.exec(["echo", "ok"], timeout=120).stdout == b"ok\n"


def test_the_jailed_vmm_cannot_open_host_files(hooked: Sandbox) -> None:
    for path in ("/etc/shadow", "/etc/hostname", "/dev/kvm", str(templates.templates_root())):
        reply = control.request(hooked._vmm.control_path, "debug-open", path=path)
        assert reply["opened"] is False, path
    assert hooked.ping()["pong"] is True


@pytest.mark.parametrize("syscall", ["execve", "ptrace"])
def test_a_forbidden_syscall_gets_the_vmm_killed_and_reported(
    hooked: Sandbox, syscall: str
) -> None:
    with pytest.raises(Exception, match="closed the control connection"):
        control.request(hooked._vmm.control_path, "debug-syscall", name=syscall)
    with pytest.raises(SandboxCrashed, match="seccomp killed the VMM"):
        hooked.ping()


def test_sigkill_of_one_vmm_spares_the_others_and_leaves_nothing(images: Images) -> None:
    boxes = [Sandbox(cpus=1.0) for _ in range(4)]  # quotas: each has a cgroup to clean up
    victim, others = boxes[0], boxes[1:]
    leftovers = [
        *(b._vmm.dir for b in boxes),
        *(p for b in boxes if b.cgroup is not None for p in b.cgroup.paths),
    ]
    pids = [pid for b in boxes for pid in (b._vmm.proc.pid, b._vmm.vmm_pid) if pid]
    try:
        vmm_pid = victim._vmm.vmm_pid
        assert vmm_pid is not None
        os.kill(vmm_pid, signal.SIGKILL)
        with pytest.raises(SandboxCrashed, match="signal 9"):
            victim.exec(["true"], timeout=120)
        for sb in others:
            assert sb.exec(["echo", "alive"], timeout=120).stdout == b"alive\n"
    finally:
        for sb in boxes:
            sb.close()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} left behind"
    for path in leftovers:
        assert not path.exists(), f"{path} left behind"
    mounts = Path("/proc/mounts").read_text()
    assert not any(str(b._vmm.dir) in mounts for b in boxes)


def test_a_guest_cpu_burner_stays_under_its_quota(images: Images) -> None:
    with Sandbox(cpus=0.25) as sb:
        cgroup = sb.cgroup
        assert cgroup is not None
        burn = threading.Thread(
            target=lambda: sb.exec(
                ["timeout", "14", "sh", "-c", "while :; do :; done"], timeout=120
            ),
        )
        burn.start()
        time.sleep(2)  # the burner is running
        used, started = cgroup.cpu_usage_seconds(), time.monotonic()
        time.sleep(10)
        rate = (cgroup.cpu_usage_seconds() - used) / (time.monotonic() - started)
        burn.join()
        assert 0.1 <= rate <= 0.3, f"{rate:.3f} CPU-s per second"


def test_a_guest_memory_bomb_is_stopped_inside_the_guest(images: Images) -> None:
    bomb = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n"
    with Sandbox() as sb:
        result = sb.exec(["python3", "-c", bomb], timeout=1500)  # ~1.3 s per emulated MiB
        assert result.exit_code != 0  # the guest's OOM killer or a MemoryError
        pid = sb._vmm.vmm_pid
        assert pid is not None
        rss_mib = int(_status(pid)["VmRSS"].split()[0]) >> 10
        assert rss_mib < DEFAULT_MEM_MIB + 128  # never more than guest RAM plus the VMM's own
        assert sb.exec(["echo", "survived"], timeout=120).stdout == b"survived\n"


def test_a_guest_fork_bomb_is_contained(images: Images) -> None:
    with Sandbox(pids=64) as sb:
        with pytest.raises(SandboxTimeout):
            sb.exec(["sh", "-c", "b() { b | b & }; b; sleep 100"], timeout=15)
        assert sb.exec(["echo", "still here"], timeout=300).stdout == b"still here\n"
        cgroup = sb.cgroup
        assert cgroup is not None and len(cgroup.pids()) <= 64  # the VMM's threads, not guests


def test_ember_run_stops_an_endless_script_on_time(images: Images, tmp_path: Path) -> None:
    script = tmp_path / "spin.py"
    script.write_text("while True:\n    pass\n")
    result = ember("run", "--cpus", "0.25", "--timeout", "5", str(script))
    assert result.returncode != 0
    assert "ran longer than 5.0 s and was killed" in result.stderr


def test_no_seccomp_says_so_loudly(images: Images, tmp_path: Path) -> None:
    spec = SandboxSpec(jail=True)
    template = templates.find(spec=spec).dir
    result = ember(
        "boot", "--restore", str(template), "--vsock-uds", str(tmp_path / "v.sock"),
        "--jail", str(tmp_path), "--no-seccomp", "--timeout", "1",
    )  # fmt: skip
    assert "WITHOUT seccomp" in result.stderr

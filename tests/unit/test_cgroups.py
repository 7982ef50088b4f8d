"""ember.jailer.cgroups against fake v1/v2 trees (a tiny fake kernel), plus one real run.

The fake kernel replaces what only cgroupfs does: filling a new directory
with control files, letting rmdir remove it with them, and treating a write
as one whole value ("+cpu" to cgroup.subtree_control adds a controller).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pytest

from ember.errors import ConfigError
from ember.jailer import cgroups
from ember.jailer.cgroups import Quotas, SandboxCgroup
from ember.spec import SandboxSpec, quotas_from

V2_FILES = {
    "cgroup.procs": "",
    "cgroup.subtree_control": "",
    "cpu.max": "max 100000\n",
    "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
    "memory.max": "max\n",
    "memory.swap.max": "max\n",
    "memory.peak": "12345678\n",
    "memory.current": "2345678\n",
    "memory.events": "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n",
    "pids.max": "max\n",
}
V1_FILES = {
    "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n"},
    "cpuacct": {"cpuacct.usage": "1500000000\n"},
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.memsw.limit_in_bytes": "9223372036854771712\n",
        "memory.max_usage_in_bytes": "4194304\n",
        "memory.usage_in_bytes": "1048576\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    },
    "pids": {"pids.max": "max\n"},
}
OWN = "/process_api/abc"


def _fill(d: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (d / name).write_text(text)


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"

    def make_dir(path: Path) -> None:
        path.mkdir()
        if (root / "cgroup.controllers").exists():
            ctrls = (path.parent / "cgroup.subtree_control").read_text()
            _fill(path, {**V2_FILES, "cgroup.controllers": ctrls})
        else:
            hierarchy = path.relative_to(root).parts[0]
            _fill(path, {"cgroup.procs": "", **V1_FILES[hierarchy]})

    def remove_dir(path: Path) -> None:
        if (path / "cgroup.procs").read_text().strip():
            raise OSError(16, "Device or resource busy")
        for f in path.iterdir():
            f.unlink()
        path.rmdir()

    def write(path: Path, value: str) -> None:
        if not path.is_file():
            raise FileNotFoundError(2, "No such file or directory", str(path))
        if path.name == "cgroup.subtree_control":
            enabled = set(path.read_text().split())
            if value[1:] not in (path.parent / "cgroup.controllers").read_text().split():
                raise OSError(2, "No such file or directory")
            value = " ".join(sorted(enabled | {value[1:]}))
        path.write_text(value)

    monkeypatch.setattr(cgroups, "_make_dir", make_dir)
    monkeypatch.setattr(cgroups, "_remove_dir", remove_dir)
    monkeypatch.setattr(cgroups, "_write", write)
    return root


def _v2_tree(root: Path, controllers: str = "cpu memory pids io") -> Path:
    parent = root / OWN.lstrip("/")
    parent.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    _fill(parent, {"cgroup.controllers": controllers + "\n", "cgroup.subtree_control": ""})
    (root.parent / "self").write_text(f"0::{OWN}\n")
    return parent


def _v1_tree(root: Path) -> None:
    lines = []
    for i, hierarchy in enumerate(V1_FILES):
        # Like this machine: only the memory hierarchy places us below the root.
        own = OWN if hierarchy == "memory" else "/"
        (root / hierarchy / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
        lines.append(f"{i + 1}:{hierarchy}:{own}")
    (root / "systemd").mkdir()
    lines += ["9:name=systemd:/", "0::/"]
    (root.parent / "self").write_text("\n".join(lines) + "\n")


def _create(root: Path, quotas: Quotas) -> SandboxCgroup:
    return SandboxCgroup.create("ember-t", quotas, root=root, self_cgroup=root.parent / "self")


# --- v2
def test_v2_writes_quotas_below_own_cgroup(fake_kernel: Path) -> None:
    parent = _v2_tree(fake_kernel)
    group = _create(fake_kernel, Quotas(cpus=0.25, memory_mib=512, pids=64))
    assert group.version == 2 and group.path == parent / "ember-t"
    assert (group.path / "cpu.max").read_text() == "25000 100000"
    assert (group.path / "memory.max").read_text() == str(512 << 20)
    assert (group.path / "memory.swap.max").read_text() == "0"
    assert (group.path / "pids.max").read_text() == "64"
    assert (parent / "cgroup.subtree_control").read_text() == "cpu memory pids"


def test_v2_enables_controllers_one_by_one(
    fake_kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _v2_tree(fake_kernel)
    written: list[tuple[str, str]] = []
    real_write = cgroups._write

    def spy(path: Path, value: str) -> None:
        written.append((path.name, value))
        real_write(path, value)

    monkeypatch.setattr(cgroups, "_write", spy)
    group = _create(fake_kernel, Quotas(cpus=1))
    assert [v for f, v in written if f == "cgroup.subtree_control"] == ["+cpu", "+memory", "+pids"]
    assert (group.path / "cpu.max").read_text() == "100000 100000"


def test_v2_usage_add_and_remove(fake_kernel: Path) -> None:
    _v2_tree(fake_kernel)
    group = _create(fake_kernel, Quotas(pids=16))
    group.add(4242)
    assert (group.path / "cgroup.procs").read_text() == "4242"
    (group.path / "cgroup.procs").write_text("")  # the fake "process" is gone
    assert group.cpu_usage_seconds() == pytest.approx(2.5)
    assert group.memory_peak_bytes() == 12345678
    assert group.memory_current_bytes() == 2345678
    assert group.oom_kills() == 2
    group.remove()
    assert not group.path.exists()
    group.remove()  # idempotent


def test_v2_missing_controller_is_a_config_error(fake_kernel: Path) -> None:
    _v2_tree(fake_kernel, controllers="memory pids")
    with pytest.raises(ConfigError, match=r"cpu.*delegate a cgroup"):
        _create(fake_kernel, Quotas(cpus=0.5))
    assert not list((fake_kernel / OWN.lstrip("/")).glob("ember-*"))


def test_v2_undelegated_controller_removes_the_group(
    fake_kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = _v2_tree(fake_kernel)

    def refuse(path: Path, value: str) -> None:
        raise OSError(16, "Device or resource busy")  # "no internal processes"

    monkeypatch.setattr(cgroups, "_write", refuse)
    with pytest.raises(ConfigError, match="subtree_control does not enable memory"):
        _create(fake_kernel, Quotas(memory_mib=128))
    assert not (parent / "ember-t").exists()


# --- v1
def test_v1_writes_quotas_in_each_hierarchy(fake_kernel: Path) -> None:
    _v1_tree(fake_kernel)
    group = _create(fake_kernel, Quotas(cpus=0.25, memory_mib=300, pids=100))
    assert group.version == 1
    cpu = fake_kernel / "cpu" / "ember-t"
    mem = fake_kernel / "memory" / OWN.lstrip("/") / "ember-t"
    assert group.path == cpu
    assert (cpu / "cpu.cfs_quota_us").read_text() == "25000"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cgroup.procs").read_text() == ""
    assert (mem / "memory.limit_in_bytes").read_text() == str(300 << 20)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(300 << 20)
    assert (fake_kernel / "pids" / "ember-t" / "pids.max").read_text() == "100"
    assert not (fake_kernel / "systemd" / "ember-t").exists()


def test_v1_add_usage_remove(fake_kernel: Path) -> None:
    _v1_tree(fake_kernel)
    group = _create(fake_kernel, Quotas(cpus=0.5))
    group.add(777)
    assert len(group.paths) == 4
    assert all((d / "cgroup.procs").read_text() == "777" for d in group.paths)
    for d in group.paths:
        (d / "cgroup.procs").write_text("")
    assert group.cpu_usage_seconds() == pytest.approx(1.5)
    assert group.memory_peak_bytes() == 4194304
    assert group.memory_current_bytes() == 1048576
    assert group.oom_kills() == 1
    group.remove()
    assert not any(d.exists() for d in group.paths)


def test_v1_comounted_cpu_cpuacct_share_one_group(fake_kernel: Path) -> None:
    _v1_tree(fake_kernel)
    both = fake_kernel / "cpu,cpuacct"
    (fake_kernel / "cpu").rename(both)
    (fake_kernel / "cpuacct").rmdir()
    V1_FILES["cpu,cpuacct"] = {**V1_FILES["cpu"], **V1_FILES["cpuacct"]}
    try:
        group = _create(fake_kernel, Quotas(cpus=0.5))
    finally:
        del V1_FILES["cpu,cpuacct"]
    assert group.path == both / "ember-t"
    assert len(group.paths) == 3
    assert group.cpu_usage_seconds() == pytest.approx(1.5)
    group.remove()
    assert not (both / "ember-t").exists()


def test_v1_partial_failure_leaves_nothing(
    fake_kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _v1_tree(fake_kernel)
    make = cgroups._make_dir

    def make_dir(path: Path) -> None:
        if "pids" in path.parts:
            raise PermissionError(13, "Permission denied")
        make(path)

    monkeypatch.setattr(cgroups, "_make_dir", make_dir)
    with pytest.raises(ConfigError, match="run as root or delegate a cgroup"):
        _create(fake_kernel, Quotas(cpus=0.5))
    assert not list(fake_kernel.rglob("ember-t"))


def test_no_cgroup_fs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no cgroup file system"):
        SandboxCgroup.create("ember-t", Quotas(cpus=1), root=tmp_path / "nope")


# --- validation
@pytest.mark.parametrize(
    "kwargs",
    [{"cpus": 0}, {"cpus": -1.0}, {"cpus": (os.cpu_count() or 1) + 1}, {"memory_mib": 63},
     {"pids": 7}, {"pids": (1 << 22) + 1}, {"pids": 10**9}, {"pids": 64.0}, {"pids": True},
     {"memory_mib": "512"}, {"memory_mib": 512.5}, {"cpus": "0.5"}, {"cpus": True}],
)  # fmt: skip
def test_quota_validation(kwargs: dict[str, object]) -> None:
    """Refused here, with the field's name, before a cgroup exists: pids=10**9 reached the
    kernel, whose EINVAL was reported as a permission problem ("run as root or delegate")."""
    (name,) = kwargs
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        Quotas(**kwargs)  # type: ignore[arg-type]
    assert Quotas(cpus=0.5, memory_mib=64, pids=1 << 22).pids == 1 << 22  # the bounds pass


def test_memory_limit_must_cover_guest_ram() -> None:
    assert quotas_from(None, None, None) is None
    SandboxSpec(mem_mib=256, quotas=quotas_from(None, 320, None))
    with pytest.raises(ConfigError, match="at least guest RAM \\+ 64 MiB = 320 MiB"):
        SandboxSpec(mem_mib=256, quotas=quotas_from(None, 319, None))


def test_cli_options() -> None:
    import argparse

    from ember.cli import run

    parser = argparse.ArgumentParser()
    run.register(parser.add_subparsers())
    argv = ["exec", "--cpus", "0.5", "--memory", "512", "--pids", "64", "--", "true"]
    args = parser.parse_args(argv)
    assert (args.cpus, args.memory, args.pids, args.timeout) == (0.5, 512, 64, None)


# --- the real thing
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups")
def test_real_cpu_quota_is_enforced() -> None:
    """A spinning child in a 0.25-CPU group gets ~0.25 CPU-s per wall second.

    CFS enforces the quota per 100 ms period, so over 3 s (30 periods) the
    overshoot is at most one period's slice plus accounting slack: 0.3 is
    the bound the quota must produce, with no extra margin.
    """
    group = SandboxCgroup.create(f"ember-test-{os.getpid()}", Quotas(cpus=0.25, pids=16))
    child: subprocess.Popen[bytes] | None = None
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", "while True: pass"], preexec_fn=group.join_self
        )
        assert group.pids() == [child.pid]
        start_usage, start = group.cpu_usage_seconds(), time.monotonic()
        time.sleep(3)
        used, wall = group.cpu_usage_seconds() - start_usage, time.monotonic() - start
        assert child.poll() is None
        assert 0.1 <= used / wall <= 0.3, f"{used:.3f} CPU-s in {wall:.3f} s"
    finally:
        group.remove()
    assert not any(d.exists() for d in group.paths)
    assert child is not None and child.wait(timeout=5) == -9


def test_real_write_never_creates_files(tmp_path: Path) -> None:
    """A missing control file means a missing controller: it must fail, not appear."""
    with pytest.raises(FileNotFoundError):
        cgroups._write(tmp_path / "cpu.max", "1000 100000")
    assert not (tmp_path / "cpu.max").exists()


def test_vmm_process_jails_before_start_and_removes_on_close(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ember import launcher

    events: list[str] = []

    class FakeGroup:
        def join_self(self) -> None:
            events.append("join")

        def remove(self) -> None:
            events.append("remove")

    class FakeProc:
        pid = 1 << 30
        returncode = 0

        def __init__(self, argv: list[str], **kw: object) -> None:
            events.append("popen")
            assert kw["preexec_fn"] == group.join_self  # entered between fork and exec
            assert kw["start_new_session"] is True

        def poll(self) -> int:
            return 0

    group = FakeGroup()

    def create(name: str, quotas: Quotas) -> FakeGroup:
        events.append(f"create {quotas.cpus}")
        assert name.startswith("ember-")
        return group

    monkeypatch.setattr(launcher, "resolve_images", lambda spec: (tmp_path, tmp_path, tmp_path))
    monkeypatch.setattr(SandboxCgroup, "create", staticmethod(create))
    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setattr(launcher.VmmProcess, "_wait_ready", lambda self, ready, t: None)
    vmm = launcher.VmmProcess(SandboxSpec(quotas=Quotas(cpus=0.5)))
    assert vmm.cgroup is cast(object, group)
    vmm.close()
    assert events == ["create 0.5", "popen", "remove"]
    assert not vmm.dir.exists()

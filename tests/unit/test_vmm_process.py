"""The VMM process's typed config, without KVM: how it travels, what parses to it, what it needs.

A sandbox's VMM gets its :class:`ProcessConfig` as JSON (over the zygote's socket, or on the
stdin of a fresh interpreter); ``ember boot`` parses argv into the same type.  These tests pin
that the config survives both hand-overs exactly, that the flags a user types mean what the
SDK's configs mean, and that the VMM's one preload list is complete and its imports stay below
the SDK and the CLI.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from ember import launcher
from ember.cli.boot import config_from_args
from ember.cli.main import build_parser
from ember.errors import ConfigError
from ember.launcher import VmmProcess
from ember.network.host import SandboxNetwork
from ember.spec import SandboxSpec, agent_argv
from ember.vmm.config import (
    DiskConfig,
    NetConfig,
    ProcessConfig,
    RestoreConfig,
    VmConfig,
    from_json,
    to_json,
)

SRC = Path(__file__).resolve().parents[2] / "src"

FULL_VM = VmConfig(
    kernel=Path("/images/vmlinux"),
    initrd=Path("/images/initrd.cpio"),
    cmdline="console=ttyS0 quiet",
    mem_mib=768,
    vcpus=2,
    cpu_template="pvm",
    extra_cmdline=("a=1", "b"),
    rootfs=Path("/images/rootfs.ext4"),
    disks=(DiskConfig(Path("/data/a.img"), True), DiskConfig(Path("/data/b.img"))),
    workload=("python3", "-m", "ember.agent", "--preload", "numpy,pandas", "é \n\0"),
    vsock_uds=Path("/tmp/ember-x/v.sock"),
    guest_cid=7,
    balloon=True,
    net=NetConfig(
        tap="tap0",
        netns="/run/netns/ember-x",
        mac="02:00:00:00:00:09",
        guest_ip="172.16.0.2/30",
        gateway="172.16.0.1",
    ),
)
FULL_RESTORE = RestoreConfig(
    Path("/cache/templates/default-0123"),
    vsock_uds=Path("/tmp/ember-y/v.sock"),
    guest_cid=9,
    tap="tap0",
    netns="/run/netns/ember-y",
)


def full_process(machine: VmConfig | RestoreConfig) -> ProcessConfig:
    return ProcessConfig(
        machine=machine,
        control=Path("/tmp/ember-x/control.sock"),
        jail=Path("/tmp/ember-x"),
        seccomp=False,
        debug_hooks=True,
        ready_file=Path("/tmp/ember-x/ready"),
        park_idle=0.25,
        timeout=12.5,
        owner_fd=7,
    )


def through_json(config: ProcessConfig) -> ProcessConfig:
    return from_json(json.loads(json.dumps(to_json(config))))


@pytest.mark.parametrize("machine", [FULL_VM, FULL_RESTORE], ids=["boot", "restore"])
def test_every_field_survives_the_json_hand_over_exactly(machine: VmConfig | RestoreConfig) -> None:
    config = full_process(machine)
    for value in (config, machine, FULL_VM.net, FULL_VM.disks[0]):
        assert value is not None
        for field in dataclasses.fields(value):  # a new field must be set here to be tested
            default = field.default_factory() if callable(field.default_factory) else field.default
            assert getattr(value, field.name) != default, f"{type(value).__name__}.{field.name}"
    back = through_json(config)
    assert back == config
    assert type(back.machine) is type(machine)
    assert isinstance(back.park_idle, float) and isinstance(back.jail, Path)


def test_defaults_survive_too() -> None:
    for machine in (VmConfig(kernel=Path("k")), RestoreConfig(Path("s"))):
        assert through_json(ProcessConfig(machine=machine)) == ProcessConfig(machine=machine)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(surprise=1), "unknown fields"),
        (lambda d: d.update(seccomp=1), "config.seccomp must be bool"),
        (lambda d: d["machine"]["VmConfig"].update(vcpus=True), "vcpus must be int"),
        (lambda d: d["machine"]["VmConfig"].update(kernel=None), "kernel must be str"),
        (lambda d: d["machine"]["VmConfig"].update(workload="sh"), "workload must be a list"),
        (lambda d: d["machine"]["VmConfig"].pop("kernel"), "kernel"),
        (lambda d: d.update(machine={"kernel": "k"}), "VmConfig or RestoreConfig"),
        (lambda d: d.update(park_idle="1"), "park_idle must be float"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(change: Any, message: str) -> None:
    data = to_json(ProcessConfig(machine=VmConfig(kernel=Path("k"))))
    change(data)
    with pytest.raises(ConfigError, match=message):
        from_json(data)


def test_a_whole_number_is_a_float_where_a_float_is_wanted() -> None:
    data = to_json(ProcessConfig(machine=RestoreConfig(Path("s"))))
    data["park_idle"] = 1
    assert from_json(data).park_idle == 1.0


# --- ember boot: argv -> the same typed config -----------------------------------------------


def parse_boot(*argv: str) -> ProcessConfig:
    return config_from_args(build_parser().parse_args(["boot", *argv]))


def handle(tmp_path: Path, *, debug_hooks: bool = False, network: bool = False) -> VmmProcess:
    """A VmmProcess with its paths set but nothing started (what boot/restore_config read)."""
    vmm = VmmProcess.__new__(VmmProcess)
    vmm.debug_hooks = debug_hooks
    vmm.dir = tmp_path
    vmm.uds = str(tmp_path / launcher.VSOCK_NAME)
    vmm.control_path = tmp_path / launcher.CONTROL_NAME
    fake = SimpleNamespace(netns_path="/run/netns/ember-test")
    vmm.network = cast(SandboxNetwork, fake) if network else None
    return vmm


@pytest.mark.parametrize("jailed", [False, True])
@pytest.mark.parametrize("network", [False, True])
def test_ember_boot_flags_parse_to_the_config_the_launcher_boots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jailed: bool, network: bool
) -> None:
    images = (tmp_path / "vmlinux", tmp_path / "rootfs.ext4", tmp_path / "initrd")
    monkeypatch.setattr(launcher, "resolve_images", lambda spec: images)
    spec = SandboxSpec(mem_mib=384, vcpus=2, cpu_template="host", jail=jailed, preload=("x",))
    vmm = handle(tmp_path, debug_hooks=True, network=network)
    # The flags the launcher used to pass to `ember boot`, before it handed the config over.
    argv = [
        "--kernel", str(images[0]), "--initrd", str(images[2]), "--rootfs", str(images[1]),
        "--mem", "384", "--vcpus", "2", "--cpu-template", "host", "--vsock-uds", vmm.uds,
        "--balloon", "--control", str(vmm.control_path),
    ]  # fmt: skip
    if jailed:
        argv += ["--jail", str(tmp_path), "--debug-hooks"]
    if network:
        argv += ["--tap", "tap0", "--netns", "/run/netns/ember-test"]
        argv += ["--guest-ip", "172.16.0.2/30", "--gateway", "172.16.0.1"]
    argv += ["--", *agent_argv(spec)]
    assert parse_boot(*argv) == vmm.boot_config(spec)


@pytest.mark.parametrize("jailed", [False, True])
@pytest.mark.parametrize("network", [False, True])
@pytest.mark.parametrize("park_idle", [None, 1.0])
def test_ember_boot_flags_parse_to_the_config_the_zygote_restores(
    tmp_path: Path, jailed: bool, network: bool, park_idle: float | None
) -> None:
    spec = SandboxSpec(jail=jailed)
    vmm = handle(tmp_path, debug_hooks=True, network=network)
    snapshot = tmp_path / "template"
    argv = [
        "--restore", str(snapshot), "--vsock-uds", vmm.uds, "--control", str(vmm.control_path),
        *(["--jail", str(tmp_path), "--debug-hooks"] if jailed else []),
        "--ready-file", str(tmp_path / launcher.READY_FILE),
        *(["--tap", "tap0", "--netns", "/run/netns/ember-test"] if network else []),
        *(["--park-idle", str(park_idle)] if park_idle is not None else []),
    ]  # fmt: skip
    config = vmm.restore_config(spec, snapshot, park_idle)
    assert parse_boot(*argv) == config
    assert through_json(config) == config


def test_ember_boot_flags_for_a_user() -> None:
    config = parse_boot(
        "--kernel", "vmlinux", "--initrd", "initrd", "--rootfs", "root.ext4",
        "--disk", "a.img:ro", "--disk", "b.img", "--guest-cid", "5", "--timeout", "3",
        "--no-seccomp", "--jail", "/tmp/j", "--", "echo", "hi",
    )  # fmt: skip
    assert config == ProcessConfig(
        machine=VmConfig(
            kernel=Path("vmlinux"),
            initrd=Path("initrd"),
            rootfs=Path("root.ext4"),
            disks=(DiskConfig(Path("a.img"), True), DiskConfig(Path("b.img"))),
            workload=("echo", "hi"),
            guest_cid=5,
        ),
        jail=Path("/tmp/j"),
        seccomp=False,
        timeout=3.0,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "give --kernel"),
        (("--restore", "s", "--kernel", "k"), "--restore takes no --kernel"),
        (("--restore", "s", "--guest-ip", "10.0.0.2/24", "--tap", "t"), "keeps the snapshot's"),
        (("--restore", "s", "--netns", "/run/netns/x"), "give --tap too"),
        (("--kernel", "k", "--gateway", "10.0.0.1"), "configure virtio-net: give --tap"),
    ],
)
def test_ember_boot_refuses_flags_that_contradict(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_boot(*argv)


# --- the fresh-interpreter path: the config on stdin -----------------------------------------


def run_python(code: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, **kwargs
    )


def test_a_fresh_interpreter_reads_the_config_exactly_from_the_launchers_fd() -> None:
    config = full_process(FULL_VM)
    fd = launcher._config_fd(config)
    try:
        result = run_python(
            textwrap.dedent("""
                import json, os
                from ember.vmm.config import to_json
                from ember.vmm.process import read_config
                config = read_config()
                print(json.dumps({"config": to_json(config),
                                  "stdin": os.readlink("/proc/self/fd/0")}))
            """),
            stdin=fd,
        )
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert from_json(out["config"]) == config
    assert out["stdin"] == "/dev/null"  # the config's file does not stay the VMM's stdin


def test_python_m_ember_vmm_process_runs_the_config_on_its_stdin(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argv = [sys.executable, "-m", "ember.vmm.process"]
    missing = ProcessConfig(machine=RestoreConfig(tmp_path / "no-such-snapshot"))
    result = subprocess.run(
        argv, input=json.dumps(to_json(missing)), env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "ember: error:" in result.stderr and "no-such-snapshot" in result.stderr
    garbage = subprocess.run(
        argv, input="--kernel x", env=env, capture_output=True, text=True, timeout=120
    )
    assert garbage.returncode == 2
    assert "ember: error: the VMM config on stdin is not JSON" in garbage.stderr


# --- the one preload list, and the layers -----------------------------------------------------

_LATE_IMPORT_CHECK = """
import ast, importlib.util, json, sys
import ember.vmm.process
ember.vmm.process.preload()

def submodule(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent is a module, not a package: name is an attribute
        return False

missing = {}
for name in sorted(m for m in sys.modules if m == "ember" or m.startswith("ember.")):
    path = getattr(sys.modules[name], "__file__", None)
    if not path:
        continue
    for func in ast.walk(ast.parse(open(path).read())):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            wanted = []
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                wanted = [node.module]
                for alias in node.names:
                    if submodule(f"{node.module}.{alias.name}"):
                        wanted.append(f"{node.module}.{alias.name}")
            missing.setdefault(name, []).extend(m for m in wanted if m not in sys.modules)
print(json.dumps(missing))
"""


def test_the_preload_list_holds_every_module_the_vmm_imports_late() -> None:
    """Once the jail's chroot is in place nothing can be imported: every import inside a
    function of a module the VMM process has loaded must already be done by preload()."""
    result = run_python(_LATE_IMPORT_CHECK)
    assert result.returncode == 0, result.stderr
    missing = {module: names for module, names in json.loads(result.stdout).items() if names}
    assert missing == {}


FORBIDDEN = ("ember.cli", "ember.launcher", "ember.vmm_handle", "ember.zygote", "ember.templates",
             "ember.sandbox", "ember.client", "ember.remote", "ember.serve")  # fmt: skip


def test_the_vmm_process_imports_nothing_of_the_sdk_or_the_cli() -> None:
    tree = ast.parse((SRC / "ember" / "vmm" / "process.py").read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert not name.startswith(FORBIDDEN), name
    result = run_python(
        "import sys, ember.vmm.process as p; p.preload(); print(' '.join(sorted(sys.modules)))"
    )
    assert result.returncode == 0, result.stderr
    assert [m for m in result.stdout.split() if m.startswith(FORBIDDEN)] == []


def test_the_zygote_preloads_the_vmm_and_nothing_of_the_sdk_or_the_cli() -> None:
    result = run_python(
        "import sys, ember.zygote as z; z._preload(); print(' '.join(sorted(sys.modules)))"
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert "ember.vmm.process" in loaded
    assert [m for m in loaded if m.startswith(FORBIDDEN) and m != "ember.zygote"] == []

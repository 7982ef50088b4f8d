"""``ember image prune`` on a cache laid out as builds leave it (no KVM, no real images).

The current inputs' keys come from the same functions the builds use (a fake kernel
tarball stands in for Debian's); the stale entries are what older inputs left. What must
hold: everything current and everything a named template needs stays, the rest goes, a
dry run deletes nothing, and a cache whose current inputs cannot be resolved is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ember import prune
from ember.cli.main import main
from ember.errors import ConfigError
from ember.images import cache, initrd, kernel_build, layers, rootfs
from ember.network.policy import NetworkPolicy
from ember.snapshot import STATE_FILE
from ember.snapshot.format import encode
from ember.spec import SandboxSpec
from ember.templates import DEFAULT, template_dir


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tarball = tmp_path / "linux-source.tar.xz"
    tarball.write_bytes(b"not really a kernel")
    monkeypatch.setenv("EMBER_LINUX_SOURCE", str(tarball))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("EMBER_TEMPLATES_DIR", raising=False)
    return tmp_path / "cache"


def entry(kind: str, key: str, files: dict[str, bytes | str]) -> Path:
    path = cache.artifact_dir(kind, key)
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def template(root: Path, name: str, config: dict[str, object]) -> Path:
    path = root / "templates" / name
    path.mkdir(parents=True)
    (path / STATE_FILE).write_bytes(encode({"config": config}))
    (path / "memory").write_bytes(b"\0" * 8192)
    (path / "template.json").write_text(json.dumps({"name": name, "rootfs": config["rootfs"]}))
    return path


def layer(key: str, parent: str) -> Path:
    return entry("rootfs-layer", key, {layers.META_FILE: json.dumps({"parent": parent})})


def lay_out(root: Path) -> tuple[set[Path], set[Path]]:
    """A cache after a few upgrades: (what must stay, what must go)."""
    image = rootfs.ImageInputs.current()
    kernel = kernel_build.KernelInputs.current(None).key()
    current_rootfs = entry("rootfs", image.key(), {rootfs.ARTIFACT_FILE: b"ext4"})
    numpy_layer = layers.layer_dir(image.layers[0]).name
    keep = {
        entry("kernel", kernel, {name: "x" for name in kernel_build.ARTIFACT_FILES}),
        entry("initrd", initrd.InitrdInputs.current().key(), {initrd.ARTIFACT_FILE: "cpio"}),
        current_rootfs,
        entry("rootfs-base", image.base.key(), {"complete": ""}),
        layer(numpy_layer, image.base.key()),
        layer("c" * 64, numpy_layer),  # a package layer over the current numpy layer
    }
    old_rootfs = entry("rootfs", "0" * 64, {rootfs.ARTIFACT_FILE: b"old ext4"})
    disk = entry("rootfs", "d" * 64, {rootfs.ARTIFACT_FILE: b"a disk"})
    gone = {
        entry("kernel", "1" * 64, {"vmlinux": "old"}),
        entry("initrd", "2" * 64, {initrd.ARTIFACT_FILE: "old"}),
        entry("rootfs", "3" * 64, {rootfs.ARTIFACT_FILE: b"older ext4"}),
        entry("rootfs-base", "4" * 64, {"complete": ""}),
        layer("5" * 64, image.base.key()),  # an older numpy layer over the same base
        layer("6" * 64, "5" * 64),  # a package layer over that one
    }
    shape = {"mem_mib": 512, "vcpus": 1, "cpu_template": "auto", "rootfs": str(current_rootfs)}
    for network in (False, True):
        spec = SandboxSpec(network=NetworkPolicy([]) if network else None)
        config = {**shape, "net": {"mac": "02:00:00:00:00:01"} if network else None}
        keep.add(template(root, template_dir(DEFAULT, spec).name, config))
    keep |= {
        # a user's template, made from an older image: it keeps that image and its disk
        template(root, "mine", {**shape, "rootfs": str(old_rootfs / rootfs.ARTIFACT_FILE),
                                "disks": [{"path": str(disk / rootfs.ARTIFACT_FILE)}]}),
        old_rootfs, disk,
    }  # fmt: skip
    gone |= {
        template(root, "default-0123456789abcdef", shape),  # an older image's default
        template(root, "default-ffffffffffffffff", {**shape, "mem_mib": "lots"}),
    }
    broken = root / "templates" / "default-eeeeeeeeeeeeeeee"
    broken.mkdir()
    (broken / STATE_FILE).write_bytes(b"garbage")
    gone.add(broken)
    (root / "rootfs" / ("7" * 64 + ".tmp")).mkdir()  # a build in progress: not touched
    return keep, gone


def listed(root: Path) -> set[Path]:
    return {
        path
        for kind in (*prune.KINDS, "templates")
        for path in (root / kind).iterdir()
        if ".tmp" not in path.name
    }


def test_prune_keeps_the_current_and_the_named_and_removes_the_rest(root: Path) -> None:
    keep, gone = lay_out(root)
    assert keep | gone == listed(root)
    dry = prune.prune(dry_run=True)
    assert {e.path for e in dry} == gone and listed(root) == keep | gone  # nothing deleted
    assert all(e.size > 0 for e in dry if e.kind == "template")
    sizes = [e.size for e in dry]
    assert sizes == sorted(sizes, reverse=True)
    assert {e.path for e in prune.prune()} == gone
    assert listed(root) == keep
    assert (root / "rootfs" / ("7" * 64 + ".tmp")).is_dir()
    assert prune.prune() == []  # again: nothing left to do


def test_an_entry_a_build_holds_is_left_alone(root: Path) -> None:
    import fcntl

    _keep, gone = lay_out(root)
    held = next(p for p in gone if p.parent.name == "kernel")
    cache.build_root().mkdir(parents=True, exist_ok=True)
    with open(cache.build_root() / f"{held.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        removed = {e.path for e in prune.prune()}
    assert removed == gone - {held} and held.is_dir()


def test_unresolvable_inputs_refuse_rather_than_guess(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lay_out(root)
    before = listed(root)
    monkeypatch.setenv("EMBER_LINUX_SOURCE", str(tmp_path / "missing.tar.xz"))
    with pytest.raises(ConfigError, match="nothing was removed"):
        prune.prune()
    assert listed(root) == before


def test_the_cli_lists_what_it_removes(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _keep, gone = lay_out(root)
    assert main(["image", "prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {len(gone)} entries" in out
    assert all(str(path) in out for path in gone)
    assert main(["image", "prune"]) == 0
    assert f"removed {len(gone)} entries" in capsys.readouterr().out
    assert not any(os.path.exists(path) for path in gone)


def test_what_a_killed_build_left_goes_once_its_lock_is_free(root: Path) -> None:
    import fcntl

    keep, gone = lay_out(root)
    locks = cache.build_root()
    locks.mkdir(parents=True, exist_ok=True)
    kernel_stage = root / "kernel" / ("8" * 64 + ".tmp")
    running = root / "initrd" / ("9" * 64 + ".tmp")
    left = {
        root / "templates" / "default-0aaaaaaaaaaaaaaa.tmp",  # a template build killed
        root / "templates" / "mine.old.4242",  # a --force rebuild killed mid-install
        kernel_stage,
    }
    for path in (*left, running):
        path.mkdir()
        (path / "memory").write_bytes(b"x" * 4096)
    for name in ("template-default-0aaaaaaaaaaaaaaa", "template-mine", "8" * 64, "9" * 64):
        (locks / f"{name}.lock").touch()
    foreign = root / "templates" / "notours.tmp"  # no lock file: no build of ours made it
    foreign.mkdir()
    with open(locks / f"{'9' * 64}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # that build still runs
        assert {e.path for e in prune.prune(dry_run=True)} == gone | left
        assert all(path.is_dir() for path in left)
        removed = {e.path for e in prune.prune()}
    assert removed == gone | left
    assert not any(path.exists() for path in left)
    assert running.is_dir() and foreign.is_dir() and listed(root) == keep
    assert {e.path for e in prune.prune()} == {running}  # its build is over now


@pytest.mark.parametrize("name", ["x.tmp", "mine.old.12", "a.b.old.7"])
def test_a_template_may_not_take_a_name_the_cache_stages_under(name: str) -> None:
    from ember.templates import check_name

    with pytest.raises(ConfigError, match=r"ending in '\.tmp'"):
        check_name(name)


@pytest.mark.parametrize("name", ["tmp", "x.tmpl", "mine.old", "old.12", "v1.2.old-3"])
def test_names_like_those_are_still_templates(name: str) -> None:
    from ember.templates import check_name

    assert check_name(name) == name

"""Cache keys and artifact lookup: no kernel is built here."""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import time
from pathlib import Path

import pytest

from ember import images
from ember.cli import image as image_cli
from ember.errors import BuildError, ConfigError, ImageNotBuilt
from ember.images import cache, initrd, kernel_build, rootfs
from ember.images.kernel_build import KernelInputs
from ember.images.progress import Progress


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache and a fake source tarball; returns the tarball."""
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    tarball.write_bytes(b"not really a tarball")
    os.utime(tarball, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    monkeypatch.setenv("EMBER_LINUX_SOURCE", str(tarball))
    return tarball


def quiet() -> Progress:
    return Progress(io.StringIO(), tty=False)


def install_fake_kernel() -> Path:
    directory = cache.artifact_dir("kernel", KernelInputs.current().key())
    directory.mkdir(parents=True)
    for name in kernel_build.ARTIFACT_FILES:
        (directory / name).write_text("6.1.999\n" if name == "release" else name)
    return directory


def test_cache_root_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EMBER_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / ".cache" / "ember"
    monkeypatch.setenv("EMBER_CACHE_DIR", "relative/dir")
    assert cache.cache_root().is_absolute()


def test_key_is_stable(env: Path) -> None:
    first = KernelInputs.current()
    assert first.key() == KernelInputs.current().key()
    assert len(first.key()) == 64
    assert first.fragment == kernel_build.load_fragment()
    assert [name for name, _ in first.patches] == sorted(name for name, _ in first.patches)
    assert len(first.patches) == len(kernel_build.load_patches()) >= 4


def test_key_changes_with_tarball_mtime_and_size(env: Path) -> None:
    before = KernelInputs.current().key()
    os.utime(env, ns=(1_700_000_000_000_000_001, 1_700_000_000_000_000_001))
    after_touch = KernelInputs.current().key()
    assert after_touch != before
    env.write_bytes(b"a different size")
    os.utime(env, ns=(1_700_000_000_000_000_001, 1_700_000_000_000_000_001))
    assert KernelInputs.current().key() not in (before, after_touch)


def test_key_changes_with_fragment_and_patches(env: Path) -> None:
    base = KernelInputs.current()
    (name, data), *rest = base.patches
    variants = [
        dataclasses.replace(base, fragment=base.fragment + b"CONFIG_IPV6=y\n"),
        dataclasses.replace(base, patches=((name, data + b"\n"), *rest)),
        dataclasses.replace(base, patches=(("0000-renamed.patch", data), *rest)),
        dataclasses.replace(base, patches=tuple(rest)),
        dataclasses.replace(base, source=Path("/elsewhere/linux.tar.xz")),
    ]
    keys = {v.key() for v in variants}
    assert len(keys) == len(variants) and base.key() not in keys


def test_recipe_is_part_of_the_key(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = KernelInputs.current().key()
    monkeypatch.setattr(kernel_build, "RECIPE", (("make", "something-else"),))
    assert KernelInputs.current().key() != before


def test_initrd_key(env: Path) -> None:
    base = initrd.InitrdInputs.current()
    assert base.init_source == initrd.load_init_source()
    assert base.key() == initrd.InitrdInputs.current().key()
    assert dataclasses.replace(base, init_source=base.init_source + b"\n").key() != base.key()


def test_artifact_path_raises_when_absent(env: Path) -> None:
    for name in images.ARTIFACTS:
        with pytest.raises(ImageNotBuilt, match=r"not built: run `ember image build`"):
            images.artifact_path(name)


def test_artifact_path_without_source_tarball(env: Path) -> None:
    env.unlink()
    with pytest.raises(ImageNotBuilt, match=r"linux-source-6\.1"):
        images.artifact_path("kernel")
    with pytest.raises(BuildError, match=r"apt-get install linux-source-6\.1"):
        images.build_all(initramfs=False, progress=quiet())


def test_artifact_path_when_present(env: Path, tmp_path: Path) -> None:
    directory = install_fake_kernel()
    assert images.artifact_path("kernel") == directory / "vmlinux"
    assert images.artifact_path("bzimage") == directory / "bzImage"
    assert images.artifact_path("kernel").is_absolute()
    assert str(images.artifact_path("kernel")).startswith(str(tmp_path / "cache" / "kernel"))
    assert images.kernel_release() == "6.1.999"
    with pytest.raises(ImageNotBuilt):
        images.artifact_path("initrd")
    # a changed input means "not built", never the stale artifact
    os.utime(env, ns=(1, 1))
    with pytest.raises(ImageNotBuilt):
        images.artifact_path("kernel")


def test_unknown_artifact(env: Path) -> None:
    with pytest.raises(ConfigError, match="kernel, bzimage, initrd, rootfs"):
        images.artifact_path("nonsense")
    with pytest.raises(ImageNotBuilt, match="root file system"):
        images.artifact_path("rootfs")


def test_cached_build_does_not_rebuild(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = install_fake_kernel()

    def no_build(*args: object) -> None:
        raise AssertionError("must not build")

    monkeypatch.setattr(kernel_build, "_build", no_build)
    out = io.StringIO()
    started = time.monotonic()
    built = kernel_build.build_kernel(progress=Progress(out, tty=False))
    assert time.monotonic() - started < 0.5
    assert built.cached and built.vmlinux == directory / "vmlinux" and built.release == "6.1.999"
    assert "cached" in out.getvalue()


def test_initrd_build_then_cached(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = initrd.build_initrd(progress=quiet())
    assert not first.cached and first.path == images.artifact_path("initrd")
    assert first.path.read_bytes()[:6] == b"070701"
    again = initrd.build_initrd(progress=quiet())
    assert again.cached and again.path == first.path
    forced = initrd.build_initrd(force=True, progress=quiet())
    assert not forced.cached and forced.path.read_bytes() == first.path.read_bytes()
    assert not list(first.path.parent.parent.glob("*.tmp")), "staging dir left behind"


def test_install_replaces_atomically(tmp_path: Path) -> None:
    final = tmp_path / "kernel" / "k"
    for content in ("one", "two"):
        staging = cache.staging_dir(final)
        (staging / "f").write_text(content)
        cache.install(staging, final)
        assert (final / "f").read_text() == content
    assert sorted(p.name for p in final.parent.iterdir()) == ["k"]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ember")
    image_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def test_cli_path(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ImageNotBuilt):
        run_cli(["image", "path", "kernel"])
    directory = install_fake_kernel()
    assert run_cli(["image", "path", "kernel"]) == 0
    assert capsys.readouterr().out == f"{directory / 'vmlinux'}\n"
    with pytest.raises(SystemExit):
        run_cli(["image", "path", "nonsense"])
    with pytest.raises(SystemExit):
        run_cli(["image", "build", "--jobs", "0"])


def test_cli_build_when_cached(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    initrd.build_initrd(progress=quiet())
    directory = install_fake_kernel()
    # the root file system has its own tests; here it must not run debootstrap
    monkeypatch.setattr(rootfs, "build_image", lambda **_kwargs: env / "rootfs.ext4")
    assert run_cli(["image", "build"]) == 0
    captured = capsys.readouterr()
    assert "kernel 6.1.999: cached" in captured.err and "initrd: cached" in captured.err
    assert f"kernel   {directory / 'vmlinux'}" in captured.out


def test_remove_tree(tmp_path: Path) -> None:
    root = tmp_path / "build"
    for d in ("a/b/c", "a/d", "e"):
        (root / d).mkdir(parents=True)
        (root / d / "f").write_text("x")
    (root / "top").write_text("x")
    (root / "a" / "link").symlink_to(tmp_path)
    cache.remove_tree(root)
    assert not root.exists() and tmp_path.exists()
    cache.remove_tree(root)  # absent: nothing to do

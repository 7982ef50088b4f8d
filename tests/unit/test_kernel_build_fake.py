"""The whole kernel build pipeline against a fake "kernel tree" whose Makefile takes a second.

It exercises extraction, patching, the config check, make output parsing, the
atomic install, the cache hit and the failure reports without compiling Linux.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from ember import images
from ember.errors import BuildError
from ember.images import kernel_build
from ember.images.progress import Progress

MAKEFILE = """\
allnoconfig:
\tgrep -v '^CONFIG_DROPPED=' $(KCONFIG_ALLCONFIG) > .config
vmlinux:
\t@echo "  CC      init/main.o"; echo "  CC      kernel/fork.o"; cat version > vmlinux
\t@if grep -q broken version; then echo "init/main.c:1: error: broken"; exit 2; fi
bzImage: vmlinux
\t@mkdir -p arch/x86/boot; echo "  LD      arch/x86/boot/setup.elf"
\t@echo bz > arch/x86/boot/bzImage
kernelrelease:
\t@echo 6.1.0-fake
"""
PATCH = b"""\
--- a/version
+++ b/version
@@ -1 +1 @@
-plain
+patched
"""


def make_tarball(tmp_path: Path, version: str = "plain") -> Path:
    tree = tmp_path / "src" / "linux-fake"
    tree.mkdir(parents=True)
    (tree / "Makefile").write_text(MAKEFILE)
    (tree / "version").write_text(version + "\n")
    tarball = tmp_path / "linux-fake.tar.xz"
    subprocess.run(["tar", "cJf", str(tarball), "-C", str(tmp_path / "src"), "linux-fake"],
                   check=True)  # fmt: skip
    return tarball


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if shutil.which("make") is None or shutil.which("patch") is None:
        pytest.skip("needs make and patch")
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBER_LINUX_SOURCE", str(make_tarball(tmp_path)))
    monkeypatch.setattr(kernel_build, "load_fragment", lambda: b"CONFIG_SMP=y\nCONFIG_PCI=n\n")
    monkeypatch.setattr(kernel_build, "load_patches", lambda: (("0001-v.patch", PATCH),))
    monkeypatch.setattr(kernel_build, "_check_tools", lambda: None)
    return tmp_path / "cache"


def test_build_installs_artifacts_then_hits_the_cache(fake: Path) -> None:
    out = io.StringIO()
    built = kernel_build.build_kernel(jobs=2, progress=Progress(out, tty=False))
    assert not built.cached
    assert built.vmlinux.read_text() == "patched\n"  # the patch was applied
    assert built.bzimage.read_text() == "bz\n"
    assert built.release == "6.1.0-fake"
    assert (built.directory / "config").read_text() == "CONFIG_SMP=y\nCONFIG_PCI=n\n"
    assert "CC      init/main.o" in (built.directory / "build.log").read_text()
    assert "patch: 0001-v.patch" in (built.directory / "inputs.txt").read_text()
    log = out.getvalue()
    assert "kernel: 3 objects compiled" in log
    assert "kernel: make -j2 vmlinux bzImage: done in" in log
    assert sorted(p.name for p in (fake / "build").iterdir()) == [f"{built.directory.name}.lock"]
    assert images.artifact_path("kernel") == built.vmlinux
    assert images.kernel_release() == "6.1.0-fake"

    again = kernel_build.build_kernel(progress=Progress(io.StringIO(), tty=False))
    assert again.cached and again.directory == built.directory
    forced = kernel_build.build_kernel(force=True, progress=Progress(io.StringIO(), tty=False))
    assert not forced.cached and forced.vmlinux.read_text() == "patched\n"
    assert sorted(p.name for p in built.directory.parent.iterdir()) == [built.directory.name]


def test_config_mismatch_names_the_options(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_build, "load_fragment", lambda: b"CONFIG_SMP=y\nCONFIG_DROPPED=y\n")
    with pytest.raises(BuildError, match=r"CONFIG_DROPPED \(wanted =y, got not set\)") as caught:
        kernel_build.build_kernel(progress=Progress(io.StringIO(), tty=False))
    key = kernel_build.KernelInputs.current().key()
    assert str(fake / "build" / f"{key}.log") in str(caught.value)
    assert (fake / "build" / f"{key}.log").is_file()
    assert not list((fake / "build").glob("kernel-*")), "build tree left behind"
    assert not (fake / "kernel" / key).exists()


def test_make_failure_keeps_the_log_and_shows_the_tail(
    fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_build, "load_patches", lambda: ())
    monkeypatch.setenv("EMBER_LINUX_SOURCE", str(make_tarball(tmp_path / "b", "broken")))
    with pytest.raises(BuildError) as caught:
        kernel_build.build_kernel(progress=Progress(io.StringIO(), tty=False))
    message = str(caught.value)
    assert "make vmlinux bzImage failed" in message
    assert "init/main.c:1: error: broken" in message
    log = Path(message.rsplit("full log: ", 1)[1].strip())
    assert log.parent == fake / "build" and "error: broken" in log.read_text()
    assert not list((fake / "build").glob("kernel-*"))


def test_patch_that_does_not_apply(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = PATCH.replace(b"-plain", b"-other")
    monkeypatch.setattr(kernel_build, "load_patches", lambda: (("0002-bad.patch", bad),))
    with pytest.raises(BuildError, match=r"applying 0002-bad.patch failed"):
        kernel_build.build_kernel(progress=Progress(io.StringIO(), tty=False))


def test_not_a_tarball(fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "junk.tar.xz"
    junk.write_bytes(b"junk")
    monkeypatch.setenv("EMBER_LINUX_SOURCE", str(junk))
    with pytest.raises(BuildError, match=r"extracting the Linux source failed"):
        kernel_build.build_kernel(progress=Progress(io.StringIO(), tty=False))


def test_tree_of_an_interrupted_build_is_swept(fake: Path) -> None:
    key = kernel_build.KernelInputs.current().key()
    stale = fake / "build" / f"kernel-{key[:12]}-killed"
    (stale / "linux").mkdir(parents=True)
    other = fake / "build" / "kernel-0123456789ab-other"  # another key's: maybe still running
    other.mkdir()
    out = io.StringIO()
    kernel_build.build_kernel(progress=Progress(out, tty=False))
    assert not stale.exists() and other.exists()
    assert "left by an interrupted build" in out.getvalue()

"""The guest root file system: Debian 12 minbase with python3, packed into ext4.

Two cached layers, because they change at very different rates:

- the *base tree*: ``debootstrap --variant=minbase --include=python3`` into a
  directory, keyed by the suite, mirror and package list (a minute and ~60 MB
  of downloads, once);
- the *image*: the base tree hard-linked into a staging directory, Ember's
  guest payload (``ember.agent`` and ``ember.protocol``, stdlib only) added to
  python3's dist-packages, then ``mkfs.ext4 -d``; keyed by the base key and
  the payload's bytes (seconds), so editing the agent never re-runs debootstrap.

The image has no journal: every sandbox mounts it read-only under a per-VM
overlay (ember-init does that), and a journal only costs mount time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Final

from ember.errors import BuildError
from ember.images import cache
from ember.images.progress import Progress
from ember.images.runner import run_logged

RECIPE_VERSION: Final = "1"
SUITE: Final = "bookworm"
PACKAGES: Final = ("python3",)
MIRROR_ENV: Final = "EMBER_DEBIAN_MIRROR"
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
ARTIFACT_FILE: Final = "rootfs.ext4"
GUEST_SITE: Final = "usr/lib/python3/dist-packages"
# Files of the host package that also run in the guest (everything else stays out).
GUEST_MODULES: Final = ("protocol.py", "agent")
GUEST_INIT: Final = b'"""Ember\'s guest-side package: the agent and the wire protocol."""\n'
SLACK_BYTES: Final = 64 << 20
_TOOLS: Final = ("debootstrap", "mkfs.ext4", "cp")


def mirror() -> str:
    return os.environ.get(MIRROR_ENV, DEFAULT_MIRROR)


@dataclasses.dataclass(frozen=True)
class BaseInputs:
    suite: str
    mirror: str
    packages: tuple[str, ...]

    @classmethod
    def current(cls) -> BaseInputs:
        return cls(SUITE, mirror(), PACKAGES)

    def key(self) -> str:
        h = cache.KeyHasher("ember-rootfs-base")
        h.add("recipe", RECIPE_VERSION)
        h.add("suite", self.suite)
        h.add("mirror", self.mirror)
        h.add("packages", ",".join(self.packages))
        return h.hexdigest()


def guest_payload() -> dict[str, bytes]:
    """Relative path under ``ember/`` -> bytes, for every guest-side source file."""
    root = Path(str(resources.files("ember")))
    files: dict[str, bytes] = {"__init__.py": GUEST_INIT}
    for name in GUEST_MODULES:
        path = root / name
        if path.is_file():
            files[name] = path.read_bytes()
        elif path.is_dir():
            for sub in sorted(path.rglob("*.py")):
                files[str(sub.relative_to(root))] = sub.read_bytes()
    return files


@dataclasses.dataclass(frozen=True)
class ImageInputs:
    base: BaseInputs
    payload: dict[str, bytes]

    @classmethod
    def current(cls) -> ImageInputs:
        return cls(BaseInputs.current(), guest_payload())

    def key(self) -> str:
        h = cache.KeyHasher("ember-rootfs-image")
        h.add("recipe", RECIPE_VERSION)
        h.add("base", self.base.key())
        for name in sorted(self.payload):
            h.add("file:" + name, self.payload[name])
        return h.hexdigest()


def image_path() -> Path:
    """Where the image for the current inputs lives (it may not exist)."""
    return cache.artifact_dir("rootfs", ImageInputs.current().key()) / ARTIFACT_FILE


def _check_tools() -> None:
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        raise BuildError(
            f"building the root file system needs {', '.join(missing)}: "
            "apt-get install debootstrap e2fsprogs"
        )
    if os.geteuid() != 0:
        raise BuildError("debootstrap must run as root to build the root file system")


def _install_dir(staging: Path, final: Path) -> None:
    if final.exists():
        cache.remove_tree(final)
    os.rename(staging, final)


def build_base(inputs: BaseInputs, progress: Progress, *, force: bool = False) -> Path:
    """The debootstrapped tree for ``inputs``, building it if needed."""
    final = cache.artifact_dir("rootfs-base", inputs.key())
    tree = final / "tree"
    if not force and (final / "complete").is_file():
        progress.note(f"rootfs base ({inputs.suite} + {', '.join(inputs.packages)}): cached")
        return tree
    with cache.build_lock(final.name):
        staging = final.with_name(final.name + ".tmp")
        if staging.exists():
            cache.remove_tree(staging)
        staging.mkdir(parents=True)
        log_path = cache.build_root() / f"{final.name}.log"
        argv = [
            "debootstrap", "--variant=minbase", f"--include={','.join(inputs.packages)}",
            inputs.suite, str(staging / "tree"), inputs.mirror,
        ]  # fmt: skip
        with progress.step(f"rootfs base: debootstrap {inputs.suite}"), log_path.open("wb") as log:
            run_logged(
                argv, what="debootstrap", cwd=staging, log=log, log_path=log_path,
                progress=progress, on_line=lambda line: f"debootstrap: {line[:70]}",
            )  # fmt: skip
        # debootstrap leaves downloaded packages behind: they are not needed in the guest.
        for deb in (staging / "tree/var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        (staging / "complete").write_text(" ".join(argv) + "\n")
        _install_dir(staging, final)
    return tree


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def build_image(*, force: bool = False, progress: Progress | None = None) -> Path:
    """Return the cached root file system image for the current inputs, building it if needed."""
    progress = progress or Progress()
    inputs = ImageInputs.current()
    final = cache.artifact_dir("rootfs", inputs.key())
    path = final / ARTIFACT_FILE
    if not force and path.is_file():
        progress.note(f"rootfs: cached in {final}")
        return path
    _check_tools()
    tree = build_base(inputs.base, progress, force=force)
    with cache.build_lock(final.name), progress.step("rootfs: pack ext4 image"):
        staging = cache.staging_dir(final)
        root = staging / "root"
        # Hard links: the payload only adds files, so the cached base is never modified.
        subprocess.run(["cp", "-al", str(tree), str(root)], check=True)
        site = root / GUEST_SITE / "ember"
        for name, data in inputs.payload.items():
            target = site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        size = _tree_bytes(root) * 5 // 4 + SLACK_BYTES
        size = (size + (1 << 20) - 1) & ~((1 << 20) - 1)
        image = staging / ARTIFACT_FILE
        with image.open("wb") as f:
            f.truncate(size)
        result = subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "ember-root", "-O", "^has_journal", "-m", "0",
             "-E", "root_owner=0:0", "-d", str(root), str(image)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise BuildError(f"mkfs.ext4 failed: {result.stderr.strip()[-2000:]}")
        cache.remove_tree(root)
        cache.install(staging, final)
    progress.note(f"rootfs: built {path} ({size >> 20} MiB)")
    return path

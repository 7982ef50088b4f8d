"""The guest root file system: Debian 12 minbase with python3 and numpy, packed into ext4.

Cached layers, because they change at very different rates:

- the *base tree*: ``debootstrap --variant=minbase --include=python3`` into a
  directory, keyed by the suite, mirror and package list (a minute and ~60 MB
  of downloads, once);
- *package layers* (:mod:`ember.images.layers`): the default one (numpy, in
  every sandbox), then, for a template with packages, one with its
  ``--pip``/``--requirements``/``--apt`` packages; each is an overlayfs upper
  directory keyed by the layer below and what it installs (seconds);
- the *image*: the base tree and the layers stacked read-only in an overlay
  with Ember's guest payload (``ember.agent`` and ``ember.protocol``, stdlib
  only) on top in python3's dist-packages, then ``mkfs.ext4 -d``; keyed by the
  base key, the layer keys and the payload's bytes (seconds), so editing the
  agent never re-runs debootstrap or pip. Every image lives under
  ``<cache>/rootfs/<key>/``: a restore attaches disks from there only
  (:func:`ember.vmm.machine_state.confine_disks`).

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
from ember.images import cache, keymemo, layers
from ember.images.packages import LayerInputs, PackageSpec, layer_chain
from ember.images.progress import Progress
from ember.images.runner import run_logged

RECIPE_VERSION: Final = "2"  # 2: C.UTF-8 in the locale archive
SUITE: Final = "bookworm"
PACKAGES: Final = ("python3",)
MIRROR_ENV: Final = "EMBER_DEBIAN_MIRROR"
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
ARTIFACT_FILE: Final = "rootfs.ext4"
GUEST_SITE: Final = "usr/lib/python3/dist-packages"
# Files of the host package that also run in the guest (everything else stays out).
GUEST_MODULES: Final = ("protocol.py", "ring.py", "agent")
GUEST_INIT: Final = b'"""Ember\'s guest-side package: the agent and the wire protocol."""\n'
SLACK_BYTES: Final = 64 << 20
LOCALE_DIR: Final = "/usr/lib/locale/C.utf8"
_TOOLS: Final = ("debootstrap", "mkfs.ext4", "unshare", "chroot")


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
    root = str(resources.files("ember"))
    files: dict[str, bytes] = {"__init__.py": GUEST_INIT}
    for path in _payload_files():  # the list the key's memo watches: one walk, one truth
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@dataclasses.dataclass(frozen=True)
class ImageInputs:
    base: BaseInputs
    layers: tuple[LayerInputs, ...]
    payload: dict[str, bytes]

    @classmethod
    def current(cls, packages: PackageSpec | None = None) -> ImageInputs:
        """The default image's inputs, or with ``packages``, a template's image's."""
        base = BaseInputs.current()
        return cls(base, layer_chain(base.key(), packages), guest_payload())

    def key(self) -> str:
        h = cache.KeyHasher("ember-rootfs-image")
        h.add("recipe", RECIPE_VERSION)
        h.add("base", self.base.key())
        for layer in self.layers:
            h.add("layer", layer.key())
        for name in sorted(self.payload):
            h.add("file:" + name, self.payload[name])
        return h.hexdigest()


def image_path(packages: PackageSpec | None = None) -> Path:
    """Where the image for the current inputs lives (it may not exist)."""
    if packages is None:  # the default image's: looked up by every Sandbox()
        key = keymemo.key(
            ("rootfs", mirror()), _payload_files(), lambda: ImageInputs.current().key()
        )
    else:
        key = ImageInputs.current(packages).key()
    return cache.artifact_dir("rootfs", key) / ARTIFACT_FILE


def _payload_files() -> list[str]:
    """What :func:`guest_payload` reads, for :mod:`ember.images.keymemo`."""
    root = Path(str(resources.files("ember")))
    return keymemo.tree([root / name for name in GUEST_MODULES], ".py")


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
        with progress.step("rootfs base: locale archive"), log_path.open("ab") as log:
            run_logged(
                _archive_locale_argv(staging / "tree"), what="localedef", cwd=staging,
                log=log, log_path=log_path, progress=progress,
            )  # fmt: skip
        (staging / "complete").write_text(" ".join(argv) + "\n")
        _install_dir(staging, final)
    return tree


def _archive_locale_argv(tree: Path) -> list[str]:
    """The guest's own ``localedef`` (in a chroot: the archive's format is its glibc's) adding
    its compiled C.UTF-8 to ``/usr/lib/locale/locale-archive``.

    Every sandbox command runs with ``LANG=C.UTF-8``, and Debian ships that locale only as
    twelve files. A program that calls ``setlocale(LC_ALL, "")`` (``env``, ``ls``, ``grep``,
    ``bash``: most of them) then opens, maps and closes each one: ~26 opens and ~13 maps,
    which cost this guest's emulated kernel ~0.3 s per command. From the archive it is one
    open and one map. A layer that installs ``locales`` may rebuild the archive; without
    C.UTF-8 in it, glibc reads the files again, as before.
    """
    return ["chroot", str(tree), "/usr/bin/localedef", "--add-to-archive", LOCALE_DIR]


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def build_layers(
    inputs: ImageInputs, progress: Progress, *, force: bool = False, force_top: bool = False
) -> list[Path]:
    """The base tree and every layer's upper directory, bottom first, built as needed.

    ``force`` rebuilds everything (debootstrap included); ``force_top`` only
    the topmost layer (a template's own packages: re-resolve unpinned ones).
    """
    lowers = [build_base(inputs.base, progress, force=force)]
    for i, layer in enumerate(inputs.layers):
        top = i == len(inputs.layers) - 1 and len(inputs.layers) > 1
        lowers.append(
            layers.build_layer(layer, lowers, progress, force=force or (force_top and top))
        )
    return lowers


def layer_paths(inputs: ImageInputs) -> list[Path]:
    """Where :func:`build_layers` puts the base tree and the layers (they may not exist)."""
    base = cache.artifact_dir("rootfs-base", inputs.base.key()) / "tree"
    return [base, *(layers.layer_dir(layer) / layers.UPPER for layer in inputs.layers)]


_PACK_SCRIPT: Final = r"""
set -eu
mount -t overlay overlay -o "ro,lowerdir=$1" "$2"
mkfs.ext4 -q -F -L ember-root -O ^has_journal -m 0 -E root_owner=0:0 -d "$2" "$3"
"""


def build_image(
    *,
    packages: PackageSpec | None = None,
    force: bool = False,
    force_packages: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Return the cached root file system image for the current inputs, building it if needed.

    Without ``packages`` this is the default image; with them, a template's
    (its packages in a layer of their own over the default image's layers).
    ``force_packages`` rebuilds that layer and the image, not the base.
    """
    progress = progress or Progress()
    inputs = ImageInputs.current(packages)
    final = cache.artifact_dir("rootfs", inputs.key())
    path = final / ARTIFACT_FILE
    if not force and not force_packages and path.is_file():
        progress.note(f"rootfs: cached in {final}")
        return path
    _check_tools()
    lowers = build_layers(inputs, progress, force=force, force_top=force_packages)
    with cache.build_lock(final.name), progress.step("rootfs: pack ext4 image"):
        staging = cache.staging_dir(final)
        try:
            size = _pack(inputs, lowers, staging)
            cache.install(staging, final)
        except BaseException:
            cache.remove_tree(staging)
            raise
    progress.note(f"rootfs: built {path} ({size >> 20} MiB)")
    return path


def _pack(inputs: ImageInputs, lowers: list[Path], staging: Path) -> int:
    """mkfs.ext4 the stacked layers plus the guest payload into ``staging``; its size."""
    payload = staging / "payload"
    site = payload / GUEST_SITE / "ember"
    for name, data in inputs.payload.items():
        target = site / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    stack = [*lowers, payload]
    size = sum(_tree_bytes(d) for d in stack) * 5 // 4 + SLACK_BYTES
    size = (size + (1 << 20) - 1) & ~((1 << 20) - 1)
    image = staging / ARTIFACT_FILE
    with image.open("wb") as f:
        f.truncate(size)
    merged = staging / "merged"
    merged.mkdir()
    argv = layers.in_mount_namespace(
        _PACK_SCRIPT, [layers.lowerdir_option(stack), str(merged), str(image)]
    )
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"mkfs.ext4 failed: {result.stderr.strip()[-2000:]}")
    merged.rmdir()
    cache.remove_tree(payload)
    return size

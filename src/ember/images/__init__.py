"""Guest images: the kernel and the test initramfs, built once and cached.

Other parts of Ember only need two calls::

    from ember.images import artifact_path, build_all
    kernel = artifact_path("kernel")    # ELF vmlinux (PVH entry): boot this on kvm_pvm
    initrd = artifact_path("initrd")    # newc cpio, uncompressed
    build_all()                         # what `ember image build` does

``artifact_path`` never builds: it computes the cache key of the *current*
inputs (config fragment, patches, source tarball, ember-init source) and
raises :class:`ember.errors.ImageNotBuilt` if that artifact is not in the
cache, so a stale kernel is never booted by mistake after a patch changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from ember.errors import BuildError, ConfigError, ImageNotBuilt
from ember.images import cache, initrd, kernel_build, keymemo, rootfs
from ember.images.progress import Progress

ARTIFACTS: Final = ("kernel", "bzimage", "initrd", "rootfs")
_KERNEL_FILES: Final = {"kernel": "vmlinux", "bzimage": "bzImage"}
_HINT: Final = "run `ember image build`"

__all__ = ["ARTIFACTS", "artifact_path", "build_all", "kernel_release"]


def _kernel_dir(source: Path | None) -> Path:
    watched = kernel_build.input_files(source)
    try:
        key = keymemo.key(
            ("kernel", str(kernel_build.source_path(source).absolute())),
            watched,
            lambda: kernel_build.KernelInputs.current(source).key(),
        )
    except BuildError as exc:
        raise ImageNotBuilt(f"the guest kernel is not built: {_HINT} ({exc})") from exc
    directory = cache.artifact_dir("kernel", key)
    if not kernel_build.is_complete(directory):
        raise ImageNotBuilt(f"the guest kernel is not built: {_HINT}")
    return directory


def artifact_path(name: str, *, source: Path | None = None) -> Path:
    """Absolute path of a built artifact for the current inputs.

    ``name`` is ``"kernel"`` (ELF vmlinux), ``"bzimage"`` or ``"initrd"``.
    ``source`` overrides the kernel tarball, as ``$EMBER_LINUX_SOURCE`` does.
    Raises ImageNotBuilt when the artifact is absent and ConfigError for an
    unknown name.
    """
    if name in _KERNEL_FILES:
        return _kernel_dir(source) / _KERNEL_FILES[name]
    if name == "initrd":
        try:
            key = keymemo.key(
                ("initrd",), initrd.input_files(), lambda: initrd.InitrdInputs.current().key()
            )
        except BuildError as exc:
            raise ImageNotBuilt(f"the test initramfs is not built: {_HINT} ({exc})") from exc
        path = cache.artifact_dir("initrd", key) / initrd.ARTIFACT_FILE
        if not path.is_file():
            raise ImageNotBuilt(f"the test initramfs is not built: {_HINT}")
        return path
    if name == "rootfs":
        path = rootfs.image_path()
        if not path.is_file():
            raise ImageNotBuilt(f"the guest root file system is not built: {_HINT}")
        return path
    raise ConfigError(f"unknown guest artifact {name!r}: expected one of {', '.join(ARTIFACTS)}")


def kernel_release(*, source: Path | None = None) -> str:
    """The built guest kernel's release (what ``/init`` prints after the marker)."""
    return (_kernel_dir(source) / "release").read_text().strip()


def build_all(
    *,
    kernel: bool = True,
    initramfs: bool = True,
    root: bool = True,
    force: bool = False,
    jobs: int | None = None,
    source: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Build (or find in the cache) the requested artifacts; return name -> path.

    ``force`` rebuilds even when cached; ``jobs`` defaults to the CPU count.
    Progress goes to stderr unless another :class:`Progress` is given.
    Raises BuildError with the failing step and its output's tail.
    """
    progress = progress or Progress()
    paths: dict[str, Path] = {}
    if initramfs:  # seconds, and it catches a missing compiler before a long kernel build
        paths["initrd"] = initrd.build_initrd(force=force, progress=progress).path
    if kernel:
        built = kernel_build.build_kernel(jobs=jobs, force=force, source=source, progress=progress)
        paths["kernel"] = built.vmlinux
        paths["bzimage"] = built.bzimage
    if root:
        paths["rootfs"] = rootfs.build_image(force=force, progress=progress)
    return paths

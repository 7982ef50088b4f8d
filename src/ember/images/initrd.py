"""The initramfs: ember-init (``initramfs/init.c``) as ``/init``, a console, nothing else.

ember-init is PID 1 of every Ember guest: with no ``ember.root=`` on the
command line it prints ``EMBER-USERSPACE-OK <kernel release>`` and resets the
VM (the VMM tests wait for that line); with one, it mounts the root disk
under an overlay and runs the workload.  It is a freestanding static C
program of a few KiB rather than busybox and a shell script because every
byte the guest kernel unpacks, and every fork+exec, costs real time under
kvm_pvm (shared/HOST.md).

The device nodes are cpio entries, not files on the host, because the kernel
does not populate ``/dev`` of an initramfs and init needs a console.

The module is named ``initrd`` because ``initramfs/`` is the data directory
next to it.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import struct
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Final

from ember.errors import BuildError
from ember.images import cache
from ember.images.cpio import CPIO_WRITER_VERSION, CpioWriter
from ember.images.progress import Progress

ARTIFACT_FILE: Final = "initrd.cpio"
_INSTALL_HINT: Final = "the compiler produced something unexpected"

# The archive's layout, hashed into the key along with the file contents.
DIRS: Final = ("dev", "proc")
DEVICES: Final = (("dev/console", 5, 1, 0o600), ("dev/null", 1, 3, 0o666))

# ember-init is freestanding: no libc, its own _start (entered with the stack
# 16-byte aligned, not as a call: no SSE, which could assume otherwise).
INIT_CC: Final = (
    "gcc", "-Os", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-pie", "-no-pie",
    "-mgeneral-regs-only", "-Wall", "-Wextra", "-Wl,--build-id=none", "-s",
    "-o", "{out}", "{src}",
)  # fmt: skip

_PT_INTERP: Final = 3
_EM_X86_64: Final = 62


def _init_source() -> resources.abc.Traversable:
    return resources.files("ember.images").joinpath("initramfs", "init.c")


def load_init_source() -> bytes:
    """ember-init's C source (``initramfs/init.c``), shipped as package data."""
    return _init_source().read_bytes()


def input_files() -> list[str | Path] | None:
    """What :meth:`InitrdInputs.current` reads, for :mod:`ember.images.keymemo`."""
    source = _init_source()
    return [source] if isinstance(source, Path) else None


def check_static_elf(data: bytes, where: Path) -> None:
    """Raise BuildError unless ``data`` is an x86-64 ELF executable without PT_INTERP.

    A dynamically linked /init would fail in the guest with a bare
    "No such file or directory" from the kernel, long after the build.
    """
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise BuildError(f"{where} is not an ELF executable: {_INSTALL_HINT}")
    if data[4] != 2 or data[5] != 1:
        raise BuildError(f"{where} is not a 64-bit little-endian ELF: {_INSTALL_HINT}")
    (machine,) = struct.unpack_from("<H", data, 18)
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if machine != _EM_X86_64:
        raise BuildError(f"{where} is not an x86-64 binary (e_machine {machine})")
    if phentsize < 4 or phoff + phentsize * phnum > len(data):
        raise BuildError(f"{where} has a truncated program header table: {_INSTALL_HINT}")
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == _PT_INTERP:
            raise BuildError(
                f"{where} is dynamically linked (it has a PT_INTERP program header) and the "
                f"initramfs has no libc: {_INSTALL_HINT}"
            )


@dataclasses.dataclass(frozen=True)
class InitrdInputs:
    """The bytes that go into the archive; :meth:`key` is its cache key."""

    init_source: bytes

    @classmethod
    def current(cls) -> InitrdInputs:
        return cls(load_init_source())

    def key(self) -> str:
        """sha256 over writer version, layout, ember-init's source and compiler flags.

        The compiler's version is not part of it (nor of the kernel's key): a
        compiler upgrade does not invalidate the cache; ``--force`` does.
        """
        h = cache.KeyHasher("ember-initrd")
        h.add("cpio-writer", CPIO_WRITER_VERSION)
        h.add("layout", repr((DIRS, DEVICES)))
        h.add("init-source", self.init_source)
        h.add("init-cc", repr(INIT_CC))
        return h.hexdigest()


def compile_init(source: bytes) -> bytes:
    """Compile ember-init into a static executable; BuildError with gcc's complaint if not."""
    if shutil.which(INIT_CC[0]) is None:
        raise BuildError(f"{INIT_CC[0]} is needed to compile ember-init: apt-get install gcc")
    root = cache.build_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ember-init-", dir=root) as tmp:
        src, out = Path(tmp) / "init.c", Path(tmp) / "init"
        src.write_bytes(source)
        argv = [arg.format(src=src, out=out) for arg in INIT_CC]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join(f"    {line}" for line in result.stderr.splitlines()[-20:])
            raise BuildError(f"compiling ember-init (initramfs/init.c) failed:\n{tail}")
        binary = out.read_bytes()
    check_static_elf(binary, Path("ember-init"))
    return binary


def write_initrd(out: BinaryIO, init_binary: bytes) -> None:
    """Write the archive; the same inputs always give the same bytes."""
    cpio = CpioWriter(out)
    for name in DIRS:
        cpio.add_dir(name)
    for name, major, minor, perm in DEVICES:
        cpio.add_char_device(name, major, minor, perm)
    cpio.add_file("init", init_binary, 0o755)
    cpio.finish()


@dataclasses.dataclass(frozen=True)
class InitrdArtifact:
    """A built initramfs in the cache."""

    path: Path
    cached: bool


def build_initrd(*, force: bool = False, progress: Progress | None = None) -> InitrdArtifact:
    """Return the cached initramfs for the current inputs, writing it first if needed."""
    progress = progress or Progress()
    inputs = InitrdInputs.current()
    final = cache.artifact_dir("initrd", inputs.key())
    path = final / ARTIFACT_FILE
    if not force and path.is_file():
        progress.note(f"initrd: cached in {final}")
        return InitrdArtifact(path, cached=True)
    buffer = io.BytesIO()
    with (
        progress.step("initrd: compile ember-init, write cpio archive"),
        cache.build_lock(final.name),
    ):
        write_initrd(buffer, compile_init(inputs.init_source))
        staging = cache.staging_dir(final)
        (staging / ARTIFACT_FILE).write_bytes(buffer.getvalue())
        cache.install(staging, final)
    progress.note(f"initrd: built in {final} ({len(buffer.getvalue()) // 1024} KiB)")
    return InitrdArtifact(path, cached=False)

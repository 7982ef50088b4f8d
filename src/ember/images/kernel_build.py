"""Build Ember's guest kernel from Debian's linux-source-6.1, once per set of inputs.

The inputs are the source tarball, the config fragment and the patches kept
in ``ember/images/kernel/``, and the recipe (the commands below).  Their hash
names the cache directory, so editing a patch or the fragment triggers a new
build and everything else is a cache hit.  The 130 MB tarball is identified by
path, size and mtime rather than hashed: a cache hit has to cost milliseconds,
and a Debian package update changes size and mtime anyway.

The module is named ``kernel_build`` because ``kernel/`` is the data directory
next to it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Final

from ember.errors import BuildError
from ember.images import cache, keymemo
from ember.images.kconfig import config_mismatches
from ember.images.progress import ObjectCounter, Progress
from ember.images.runner import run_logged

#: Bump when the build changes in a way the hashed inputs do not show.
RECIPE_VERSION: Final = "ember-kernel-1"
DEFAULT_SOURCE: Final = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_ENV: Final = "EMBER_LINUX_SOURCE"
ARTIFACT_FILES: Final = ("vmlinux", "bzImage", "config", "release")
MIN_FREE_BYTES: Final = 2 << 30  # extracted tree ~1.3 GB plus objects

# The recipe, hashed into the key.  "{tarball}"/"{fragment}" are filled in at
# run time; make's -j is not part of it (it does not change the output).
EXTRACT: Final = ("tar", "xf", "{tarball}", "--strip-components=1")
PATCH: Final = ("patch", "-p1", "--forward", "--batch")  # the patch comes on stdin
CONFIGURE: Final = ("make", "allnoconfig", "KCONFIG_ALLCONFIG={fragment}")
BUILD: Final = ("make", "vmlinux", "bzImage")
RELEASE: Final = ("make", "-s", "kernelrelease")
RECIPE: Final = (EXTRACT, PATCH, CONFIGURE, BUILD, RELEASE)

REQUIRED_TOOLS: Final = ("tar", "xz", "patch", "make", "gcc", "ld", "flex", "bison", "bc", "perl")
# Variables that would silently change what Kbuild builds or where.
_SCRUBBED_ENV: Final = (
    "ARCH",
    "CROSS_COMPILE",
    "KBUILD_OUTPUT",
    "KCONFIG_CONFIG",
    "LLVM",
    "KCFLAGS",
    "KCPPFLAGS",
    "KAFLAGS",
    "LOCALVERSION",
    "INSTALL_PATH",
)


def source_path(source: Path | None = None) -> Path:
    """The tarball: ``source`` if given, else ``$EMBER_LINUX_SOURCE``, else Debian's path."""
    if source is not None:
        return source
    configured = os.environ.get(SOURCE_ENV)
    return Path(configured) if configured else DEFAULT_SOURCE


def _kernel_data() -> resources.abc.Traversable:
    return resources.files("ember.images").joinpath("kernel")


def load_fragment() -> bytes:
    """The Kconfig fragment shipped with Ember (``kernel/ember.config``)."""
    return _kernel_data().joinpath("ember.config").read_bytes()


def input_files(source: Path | None = None) -> list[str | Path] | None:
    """The files :meth:`KernelInputs.current` reads (and the patch directory), for
    :mod:`ember.images.keymemo`; None where the package data are not plain files."""
    data = _kernel_data()
    if not isinstance(data, Path):
        return None
    return [source_path(source).absolute(), *keymemo.tree([data], ".patch"), data / "ember.config"]


def load_patches() -> tuple[tuple[str, bytes], ...]:
    """Ember's kernel patches as (file name, bytes), in the sorted order they apply in."""
    patches = [p for p in _kernel_data().joinpath("patches").iterdir() if p.name.endswith(".patch")]
    return tuple((p.name, p.read_bytes()) for p in sorted(patches, key=lambda p: p.name))


def patched_files(patch: bytes, *, created: bool | None = None) -> list[str]:
    """Tree-relative paths a ``-p1`` unified diff touches (its ``+++ b/...`` lines); with
    ``created``, only the files it creates (``--- /dev/null``) or only those it modifies."""
    files = []
    new = False
    for line in patch.decode(errors="replace").splitlines():
        if line.startswith("--- "):
            new = line[len("--- ") :].split("\t")[0].strip() == "/dev/null"
        elif line.startswith("+++ b/") and created in (None, new):
            files.append(line[len("+++ b/") :].split("\t")[0].strip())
    return files


@dataclasses.dataclass(frozen=True)
class KernelInputs:
    """Everything that decides the kernel's bytes; :meth:`key` is its cache key."""

    source: Path
    source_size: int
    source_mtime_ns: int
    fragment: bytes
    patches: tuple[tuple[str, bytes], ...]

    @classmethod
    def current(cls, source: Path | None = None) -> KernelInputs:
        """The inputs as they are now; BuildError if the tarball is missing."""
        path = source_path(source).absolute()
        try:
            st = path.stat()
        except OSError as exc:
            raise BuildError(
                f"the Linux source tarball {path} is missing ({exc.strerror}): "
                f"apt-get install linux-source-6.1 (or point ${SOURCE_ENV} at it)"
            ) from exc
        return cls(path, st.st_size, st.st_mtime_ns, load_fragment(), load_patches())

    def key(self) -> str:
        """sha256 over recipe version, tarball identity, fragment, patches and commands."""
        h = cache.KeyHasher(RECIPE_VERSION)
        h.add("source-path", str(self.source))
        h.add("source-size", self.source_size)
        h.add("source-mtime-ns", self.source_mtime_ns)
        h.add("fragment", self.fragment)
        h.add("patch-count", len(self.patches))
        for name, data in self.patches:
            h.add("patch-name", name)
            h.add("patch", data)
        h.add("recipe", repr(RECIPE))
        return h.hexdigest()

    def describe(self) -> str:
        """Human-readable summary, stored next to the artifacts as ``inputs.txt``."""
        lines = [
            f"recipe: {RECIPE_VERSION}",
            f"source: {self.source} size={self.source_size} mtime_ns={self.source_mtime_ns}",
            f"fragment: {len(self.fragment)} bytes",
            *(f"patch: {name} ({len(data)} bytes)" for name, data in self.patches),
        ]
        return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class KernelArtifacts:
    """A built kernel in the cache."""

    directory: Path
    cached: bool

    @property
    def vmlinux(self) -> Path:
        """The ELF image with the PVH entry note: the one to boot on kvm_pvm."""
        return self.directory / "vmlinux"

    @property
    def bzimage(self) -> Path:
        """The compressed image (its decompressor runs emulated: ~27 s slower)."""
        return self.directory / "bzImage"

    @property
    def release(self) -> str:
        """``uname -r`` of the guest, e.g. ``6.1.158``."""
        return (self.directory / "release").read_text().strip()


def is_complete(directory: Path) -> bool:
    """True when every artifact file is there (installs are atomic; this guards hand edits)."""
    return all((directory / name).is_file() for name in ARTIFACT_FILES)


def default_jobs() -> int:
    """Like ``nproc``: the CPUs this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def build_kernel(
    *,
    jobs: int | None = None,
    force: bool = False,
    source: Path | None = None,
    progress: Progress | None = None,
) -> KernelArtifacts:
    """Return the cached kernel for the current inputs, building it first if needed."""
    progress = progress or Progress()
    inputs = KernelInputs.current(source)
    key = inputs.key()
    final = cache.artifact_dir("kernel", key)
    if not force and is_complete(final):
        found = KernelArtifacts(final, cached=True)
        progress.note(f"kernel {found.release}: cached in {final}")
        return found
    _check_tools()
    with cache.build_lock(key):
        if not force and is_complete(final):  # another process built it while we waited
            return KernelArtifacts(final, cached=True)
        _build(inputs, key, final, jobs or default_jobs(), progress)
    built = KernelArtifacts(final, cached=False)
    progress.note(f"kernel {built.release}: built in {final}")
    return built


def _check_tools() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise BuildError(
            f"cannot build the guest kernel, missing {', '.join(missing)}: "
            "apt-get install build-essential flex bison bc libelf-dev libssl-dev xz-utils"
        )


def _build_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["LC_ALL"] = "C"  # stable, greppable tool messages in the log
    return env


def _build(inputs: KernelInputs, key: str, final: Path, jobs: int, progress: Progress) -> None:
    root = cache.build_root()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < MIN_FREE_BYTES:
        raise BuildError(
            f"only {free / 2**30:.1f} GiB free under {root}; the kernel build needs about "
            f"{MIN_FREE_BYTES / 2**30:.0f} GiB (set $EMBER_CACHE_DIR to a roomier place)"
        )
    log_path = root / f"{key}.log"
    prefix = f"kernel-{key[:12]}-"
    for stale in root.glob(prefix + "*"):  # a killed build of this key; we hold its lock
        progress.note(f"kernel: removing {stale}, left by an interrupted build")
        cache.remove_tree(stale)
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    progress.note(f"kernel: building in {workdir} (log: {log_path})")
    try:
        with open(log_path, "wb") as log:
            release = _compile(inputs, workdir, log, log_path, jobs, progress)
        staging = cache.staging_dir(final)
        tree = workdir / "linux"
        os.replace(tree / "vmlinux", staging / "vmlinux")
        os.replace(tree / "arch/x86/boot/bzImage", staging / "bzImage")
        shutil.copyfile(tree / ".config", staging / "config")
        (staging / "release").write_text(release + "\n")
        (staging / "inputs.txt").write_text(inputs.describe())
        os.replace(log_path, staging / "build.log")
        cache.install(staging, final)
    finally:
        with progress.step("kernel: remove build tree"):
            cache.remove_tree(workdir)


def _compile(
    inputs: KernelInputs,
    workdir: Path,
    log: BinaryIO,
    log_path: Path,
    jobs: int,
    progress: Progress,
) -> str:
    """Extract, patch, configure and make in ``workdir``; return the kernel release."""
    tree = workdir / "linux"
    tree.mkdir()
    fragment = workdir / "ember.config"
    fragment.write_bytes(inputs.fragment)
    env = _build_env()
    values = {"tarball": str(inputs.source), "fragment": str(fragment)}

    def run(
        argv: tuple[str, ...],
        what: str,
        stdin: bytes | None = None,
        on_line: Callable[[str], str | None] | None = None,
    ) -> None:
        cmd = [arg.format(**values) for arg in argv]
        run_logged(
            cmd,
            what=what,
            cwd=tree,
            log=log,
            log_path=log_path,
            progress=progress,
            env=env,
            stdin=stdin,
            on_line=on_line,
        )

    with progress.step(f"kernel: extract {inputs.source.name}"):
        run(EXTRACT, "extracting the Linux source")
    with progress.step(f"kernel: apply {len(inputs.patches)} patches"):
        for name, data in inputs.patches:
            run(PATCH, f"applying {name}", stdin=data)
    with progress.step("kernel: configure (make allnoconfig + fragment)"):
        run(CONFIGURE, "make allnoconfig")
        problems = config_mismatches(inputs.fragment.decode(), (tree / ".config").read_text())
        if problems:
            raise BuildError(
                "the kernel config does not honour the fragment (missing dependency or renamed "
                f"option?): {'; '.join(problems)}; full log: {log_path}"
            )
    counter = ObjectCounter("kernel: make")

    def on_line(line: str) -> str | None:
        return counter.message() if counter.feed(line) else None

    with progress.step(f"kernel: make -j{jobs} vmlinux bzImage"):
        run((*BUILD, f"-j{jobs}"), "make vmlinux bzImage", on_line=on_line)
        progress.note(f"kernel: {counter.count} objects compiled")
    result = subprocess.run(
        list(RELEASE), cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    release = result.stdout.strip()
    if result.returncode != 0 or not release:
        raise BuildError(f"make -s kernelrelease failed: {result.stderr.strip()} (log: {log_path})")
    return release

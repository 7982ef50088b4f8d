"""Building a package layer of the root file system on the host, without booting the guest.

The guest is Debian 12 with its python3.11 and so is the host, so packages are
installed by the host into the guest's own tree, in seconds, instead of by the
emulated guest kernel, in minutes:

1. **fetch** (host, network): ``pip wheel`` with the host's own pip
   configuration (index, certificates, proxies) puts every wheel the
   requirements resolve to in a wheelhouse, building sdists and local
   projects into wheels. Only this step reaches the network for pip.
2. **install** (host, in the guest's tree): in a private mount namespace
   (``unshare --mount``, so every mount is gone when the step ends, even if it
   is killed) an overlay mounts the lower layers read-only with a fresh upper
   directory on top; ``chroot`` into it runs the guest's ``apt-get install``
   (apt's lists and downloads on a tmpfs, services forbidden by a
   ``policy-rc.d``) and then the guest's ``python3 -m pip install --no-index``
   from the wheelhouse, using the host's pip package bind-mounted read-only
   (the base tree has no pip). The guest's interpreter decides the install
   paths (``/usr/local/lib/python3.11/dist-packages``), script shebangs and
   compatible wheel tags, and compiles the ``.pyc`` files the read-only guest
   could not write. Packages already in a lower layer that satisfy a
   requirement stay as they are.
3. The upper directory *is* the layer: installed under
   ``<cache>/rootfs-layer/<key>/upper`` by a rename once complete.

A failure removes the half-built layer and raises a one-line
:class:`~ember.errors.BuildError` quoting pip's or apt's own error line (the
full output stays in ``<cache>/build/<key>.log``). Building needs root (mounts,
chroot) and trusts the packages: their build scripts run on the host as root.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ember.errors import BuildError
from ember.images import cache
from ember.images.packages import LayerInputs
from ember.images.progress import Progress
from ember.images.runner import run_logged

GUEST_PYTHON: Final = (3, 11)
GUEST_PLATFORM: Final = "manylinux_2_36_x86_64"  # Debian 12's glibc
GUEST_SITE: Final = "usr/local/lib/python3.11/dist-packages"
GUEST_PIP_DIR: Final = "/tmp/ember-pip"
GUEST_WHEELS: Final = "/tmp/ember-wheels"
LAYER_KIND: Final = "rootfs-layer"
UPPER: Final = "upper"
META_FILE: Final = "layer.json"
COMPLETE: Final = "complete"
GUEST_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# pip: "ERROR: No matching distribution found for x"; apt: "E: Unable to locate package x".
_ERROR_LINE: Final = re.compile(r"^(ERROR|E): ")
_PROGRESS_LINE: Final = re.compile(r"^Progress (\d+) of (\d+)$")
_STEP_LINE: Final = re.compile(
    r"^(Collecting|Processing|Building wheel for|Saved|Get:\d+|Unpacking|Setting up|Installing)"
)

# Runs in a private mount namespace; its mounts vanish with it.
# Arguments: lowerdir upperdir workdir merged pip-dir wheel-dir "apt pkgs" [pip args...]
_INSTALL_SCRIPT: Final = r"""
set -eu
lower=$1 upper=$2 work=$3 m=$4 pipdir=$5 wheels=$6 apt=$7
shift 7
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$m"
mount -t tmpfs -o mode=1777 tmpfs "$m/tmp"
mount -t proc proc "$m/proc"
mount --rbind /dev "$m/dev"
if [ -f /etc/resolv.conf ] && [ -f "$m/etc/resolv.conf" ]; then
  mount --bind /etc/resolv.conf "$m/etc/resolv.conf"
fi
guest() { chroot "$m" /usr/bin/env -i PATH="$GUEST_PATH" HOME=/root LANG=C.UTF-8 "$@"; }
if [ -n "$apt" ]; then
  mount -t tmpfs tmpfs "$m/var/lib/apt/lists"
  mount -t tmpfs tmpfs "$m/var/cache/apt"
  mkdir -p "$m/var/lib/apt/lists/partial" "$m/var/cache/apt/archives/partial"
  printf '#!/bin/sh\nexit 101\n' > "$m/usr/sbin/policy-rc.d"
  chmod 755 "$m/usr/sbin/policy-rc.d"
  guest DEBIAN_FRONTEND=noninteractive apt-get update -q
  guest DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $apt
  rm -f "$m/usr/sbin/policy-rc.d"
fi
if [ $# -gt 0 ]; then
  mkdir -p "$m$GUEST_PIP_DIR/pip" "$m$GUEST_WHEELS"
  mount --bind -o ro "$pipdir" "$m$GUEST_PIP_DIR/pip"
  mount --bind -o ro "$wheels" "$m$GUEST_WHEELS"
  guest PYTHONPATH="$GUEST_PIP_DIR" python3 -m pip install --no-index \
    --find-links "$GUEST_WHEELS" --no-cache-dir --break-system-packages \
    --root-user-action=ignore --disable-pip-version-check --no-warn-script-location \
    --progress-bar off "$@"
fi
"""

# Arguments: lowerdir merged module...
_IMPORT_SCRIPT: Final = r"""
set -eu
lower=$1 m=$2
shift 2
mount -t overlay overlay -o "ro,lowerdir=$lower" "$m"
mount -t tmpfs -o mode=1777 tmpfs "$m/tmp"
mount -t proc proc "$m/proc"
mount --rbind /dev "$m/dev"
chroot "$m" /usr/bin/env -i PATH="$GUEST_PATH" HOME=/root LANG=C.UTF-8 python3 -c "$CHECK" "$@"
"""
_IMPORT_CHECK: Final = """
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        print(f"ERROR: cannot import {name}: {type(exc).__name__}: {exc}".splitlines()[0])
        sys.exit(1)
"""


def host_pip() -> list[str]:
    """The pip that fetches wheels: Ember's own interpreter's (a test may substitute one)."""
    if importlib.util.find_spec("pip") is None:
        raise BuildError(
            f"installing Python packages into a template needs pip next to Ember: "
            f"{sys.executable} -m ensurepip"
        )
    return [sys.executable, "-m", "pip"]


def _progress_bar() -> str:
    """``raw`` (one "Progress N of M" line per chunk: a real download bar) where pip has it."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("pip").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "off"
    return "raw" if (major, minor) >= (24, 1) else "off"


def pip_package_dir() -> Path:
    """The host's ``pip`` package directory, bind-mounted for the guest's python3 to run."""
    spec = importlib.util.find_spec("pip")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"no pip next to Ember: {sys.executable} -m ensurepip")
    return Path(next(iter(spec.submodule_search_locations)))


def lowerdir_option(lowers: Sequence[Path]) -> str:
    """overlayfs ``lowerdir=``: topmost first; ``lowers`` is given bottom first."""
    for path in lowers:
        if any(c in str(path) for c in ":,\n"):
            raise BuildError(f"cannot stack {path} in an overlay: rename the cache directory")
    return ":".join(str(p) for p in reversed(lowers))


class _Watch:
    """Follows a command's output: keeps its first error line and turns lines into status."""

    def __init__(self, label: str, progress: Progress) -> None:
        self.label = label
        self.progress = progress
        self.error: str | None = None
        self.last = ""

    def __call__(self, line: str) -> str | None:
        line = line.strip()
        if not line:
            return None
        if _ERROR_LINE.match(line) and self.error is None:
            self.error = line
        match = _PROGRESS_LINE.match(line)
        if match is not None:
            transfer = getattr(self.progress, "transfer", None)
            if transfer is not None:
                transfer(int(match.group(1)), int(match.group(2)))
            return None
        self.last = line
        step = _STEP_LINE.match(line)
        return f"{self.label}: {line[:90]}" if step is not None else None

    def reason(self) -> str:
        return self.error or self.last or "no output"


def run_step(
    argv: Sequence[str],
    *,
    what: str,
    label: str,
    log_path: Path,
    progress: Progress,
    env: dict[str, str] | None = None,
) -> None:
    """Run one build command, its output appended to ``log_path``; one-line BuildError if
    it fails (the command's own error line, e.g. pip's ``ERROR: ...``)."""
    watch = _Watch(label, progress)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        try:
            run_logged(
                argv, what=what, cwd=log_path.parent, log=log, log_path=log_path,
                progress=progress, env=env, on_line=watch,
            )  # fmt: skip
        except BuildError:
            raise BuildError(f"{what} failed: {watch.reason()} (full log: {log_path})") from None


def in_mount_namespace(script: str, args: Sequence[str]) -> list[str]:
    """argv running ``script`` (sh) with ``args`` in a private mount namespace of its own."""
    if shutil.which("unshare") is None or shutil.which("chroot") is None:
        raise BuildError("building root file system layers needs unshare and chroot (util-linux)")
    if os.geteuid() != 0:
        raise BuildError("building root file system layers needs root (mounts and chroot)")
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *args]


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a namespace script: ours, plus the guest's PATH and ``extra``."""
    return {**os.environ, "GUEST_PATH": GUEST_PATH, **extra}


def _fetch_wheels(
    inputs: LayerInputs, wheels: Path, log_path: Path, progress: Progress
) -> list[str]:
    """Resolve and download (or build) every wheel on the host; return the guest's pip args."""
    pip = host_pip()
    guest_args: list[str] = []
    common = ["--disable-pip-version-check", "--progress-bar", _progress_bar()]
    if sys.version_info[:2] == GUEST_PYTHON:
        fetch = [*pip, "wheel", *common, "--wheel-dir"]
    else:  # another Python here: only wheels for the guest's can be had, none built
        fetch = [*pip, "download", *common, "--only-binary=:all:", "--implementation", "cp",
                 "--python-version", "3.11", "--platform", GUEST_PLATFORM, "--dest"]  # fmt: skip
    if inputs.local:
        local = wheels / "local"
        local.mkdir(parents=True)
        with progress.step(f"pip: build {len(inputs.local)} local package(s)"):
            run_step(
                [*fetch, str(local), "--no-deps", *(str(p) for p, _ in inputs.local)],
                what="pip (local packages)", label="pip", log_path=log_path, progress=progress,
            )  # fmt: skip
        built = sorted(local.iterdir())
        guest_args += [f"{GUEST_WHEELS}/local/{p.name}" for p in built]
    for i, text in enumerate(inputs.requirements):
        (wheels / f"requirements-{i}.txt").write_bytes(text)
        guest_args += ["-r", f"{GUEST_WHEELS}/requirements-{i}.txt"]
    guest_args += list(inputs.pip)
    host_args = [a.replace(GUEST_WHEELS, str(wheels)) for a in guest_args]
    with progress.step(f"pip: fetch {inputs.summary()}"):
        run_step(
            [*fetch, str(wheels), *host_args], what="pip", label="pip",
            log_path=log_path, progress=progress,
        )  # fmt: skip
    return guest_args


def layer_dir(inputs: LayerInputs) -> Path:
    return cache.artifact_dir(LAYER_KIND, inputs.key())


def is_built(inputs: LayerInputs) -> bool:
    return (layer_dir(inputs) / COMPLETE).is_file()


def build_layer(
    inputs: LayerInputs, lowers: Sequence[Path], progress: Progress, *, force: bool = False
) -> Path:
    """The layer's upper directory for ``inputs`` over ``lowers`` (bottom first), built if
    needed. Nothing is left under the layer's key unless the build completed."""
    final = layer_dir(inputs)
    if not force and (final / COMPLETE).is_file():
        progress.note(f"rootfs layer ({inputs.summary()}): cached")
        return final / UPPER
    with cache.build_lock(final.name):
        if not force and (final / COMPLETE).is_file():  # built by another process meanwhile
            return final / UPPER
        staging = final.with_name(final.name + ".tmp")
        log_path = cache.build_root() / f"{final.name}.log"
        with contextlib.suppress(FileNotFoundError):
            log_path.unlink()
        try:
            _build_into(inputs, lowers, staging, log_path, progress)
            if final.exists():
                cache.remove_tree(final)
            os.rename(staging, final)
        except BaseException:
            cache.remove_tree(staging)
            raise
    return final / UPPER


def _build_into(
    inputs: LayerInputs, lowers: Sequence[Path], staging: Path, log_path: Path, progress: Progress
) -> None:
    if staging.exists():
        cache.remove_tree(staging)  # left by an interrupted build
    wheels, upper, work, merged = (staging / n for n in ("wheels", UPPER, "work", "merged"))
    for d in (wheels, upper, work, merged):
        d.mkdir(parents=True)
    guest_args = _fetch_wheels(inputs, wheels, log_path, progress) if inputs.wants_pip() else []
    argv = in_mount_namespace(
        _INSTALL_SCRIPT,
        [lowerdir_option(lowers), str(upper), str(work), str(merged), str(pip_package_dir()),
         str(wheels), " ".join(inputs.apt), *guest_args],
    )  # fmt: skip
    env = script_env(GUEST_PIP_DIR=GUEST_PIP_DIR, GUEST_WHEELS=GUEST_WHEELS)
    what = "installing " + inputs.summary()
    with progress.step(f"rootfs layer: install {inputs.summary()} into the guest's tree"):
        run_step(argv, what=what, label="install", log_path=log_path, progress=progress, env=env)
    for d in (wheels, work, merged):
        shutil.rmtree(d)
    meta = {"inputs": inputs.summary(), "parent": inputs.parent, "python": installed(upper)}
    (staging / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    (staging / COMPLETE).write_text(inputs.key() + "\n")


def installed(upper: Path) -> dict[str, str]:
    """Python distributions a layer installed: name -> version, from their dist-info."""
    found: dict[str, str] = {}
    site = upper / GUEST_SITE
    if site.is_dir():
        for info in sorted(site.glob("*.dist-info")):
            name, _, version = info.name[: -len(".dist-info")].partition("-")
            found[name] = version
    return found


def check_imports(
    lowers: Sequence[Path], modules: Sequence[str], progress: Progress, log_path: Path
) -> None:
    """Import ``modules`` with the guest's python3 in the guest's tree, natively on the host:
    a misspelt ``--preload`` fails in a second rather than after a guest boot."""
    if not modules:
        return
    merged = cache.build_root() / f"import-check.{os.getpid()}"
    merged.mkdir(parents=True, exist_ok=True)
    try:
        argv = in_mount_namespace(_IMPORT_SCRIPT, [lowerdir_option(lowers), str(merged), *modules])
        env = script_env(CHECK=_IMPORT_CHECK)
        with progress.step(f"check that {', '.join(modules)} import in the guest's tree"):
            run_step(
                argv, what="--preload", label="import", log_path=log_path, progress=progress,
                env=env,
            )  # fmt: skip
    finally:
        with contextlib.suppress(OSError):
            merged.rmdir()

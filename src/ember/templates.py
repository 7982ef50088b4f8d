"""Templates: snapshots of a booted, warmed sandbox that new sandboxes are restored from.

The default template is the default image booted with the agent running,
its code worker warm and numpy imported, snapshotted, and cached under
``<cache>/templates/default-<key>`` where the key hashes every input (kernel,
initrd, root file system, guest RAM, vCPUs, CPU template, snapshot format,
the agent's command line with its ``--preload`` list): change one and the
next ``Sandbox()`` builds a new template once.  Named templates
(``ember template build NAME``, ``sb.snapshot(NAME)``) live in
``<cache>/templates/NAME``.

A template with packages (``ember template build sci --pip pandas --apt jq
--preload pandas``, :func:`build_with_packages`) boots a root file system of
its own: the default image's layers plus one with its packages, built on the
host (:mod:`ember.images.layers`) and kept in the image cache, where restores
may attach disks from. Its interpreters import numpy and the ``--preload``
modules before the snapshot; an import that fails is a build error (checked
first on the host in the image's tree, then in the guest), never a restore-time
one.  Its metadata records the inputs' key, so building it again with other
packages rebuilds it and with the same ones is a cache hit.

A template's memory file carries a SHA-256 checked once per host process
before its first restore, so a template damaged on disk is refused rather
than restored into a guest that crashes later.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember import template_prefault
from ember.arch.x86_64.cpuid import resolve_template
from ember.descriptors import descriptors_checked
from ember.errors import ConfigError, SnapshotError
from ember.images.cache import (
    KeyHasher,
    build_lock,
    build_root,
    cache_root,
    install,
    remove_tree,
    staging_dir,
)
from ember.images.progress import Progress
from ember.launcher import VmmProcess
from ember.snapshot import MEMORY_FILE, STATE_FILE
from ember.snapshot.format import FORMAT_VERSION, read_state
from ember.snapshot.memory_file import memory_digest
from ember.spec import SandboxSpec, agent_argv, resolve_images, resolve_preload
from ember.stamps import stamp
from ember.template_warm import check_preload, wait_warm
from ember.vmm.config import DEFAULT_CMDLINE

if TYPE_CHECKING:
    from ember.images.packages import PackageSpec

DEFAULT = "default"
META_FILE = "template.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED = re.compile(r"(\.tmp|\.old\.[0-9]+)$")
VERIFIED_FILE = "verified.json"  # see verify()
_verified: set[tuple[str, str]] = set()
_verify_lock = threading.Lock()


@dataclass(frozen=True)
class Template:
    name: str
    dir: Path
    meta: dict[str, Any]


TEMPLATES_ENV = "EMBER_TEMPLATES_DIR"


def templates_root() -> Path:
    """``$EMBER_TEMPLATES_DIR``, else ``<cache>/templates``.  The override gives one host's
    daemons template stores of their own while they share the image cache (and so the
    templates' keys, which name image paths): two simulated cluster nodes on one machine,
    each lacking what the other built."""
    configured = os.environ.get(TEMPLATES_ENV)
    if configured:
        return Path(configured).expanduser().absolute()
    return cache_root() / "templates"


def check_name(name: str) -> str:
    """A template's name; not one the cache uses for a build's staging (``NAME.tmp``) or
    for a directory being replaced (``NAME.old.PID``): ``ember image prune`` removes those
    once their build is over."""
    if not _NAME.match(name) or name.startswith(f"{DEFAULT}-") or _RESERVED.search(name):
        raise ConfigError(
            f"template name {name!r}: use letters, digits, '_', '.', '-' (up to 64), "
            f"not starting with '{DEFAULT}-' nor ending in '.tmp' or '.old.<digits>'"
        )
    return name


def default_key(spec: SandboxSpec) -> str:
    kernel, rootfs, initrd = resolve_images(spec)
    key = KeyHasher("template")
    for label, value in (
        ("kernel", str(kernel)), ("initrd", str(initrd)), ("rootfs", str(rootfs)),
        ("mem_mib", spec.mem_mib), ("vcpus", spec.vcpus), ("cpu_template", spec.cpu_template),
        ("cpu_features", resolve_template(spec.cpu_template).signature()),
        ("cmdline", DEFAULT_CMDLINE),
        ("format", FORMAT_VERSION), ("agent", " ".join(agent_argv(spec))),
        ("warm", "worker sockets, page cache, vsock rx refilled, code ring polling"),  # wait_warm
        ("prefault", template_prefault.FIRST_CALLS),
        ("huge", template_prefault.HUGE_PAGES),
        ("devices", "rootfs vsock balloon" + (" net" if spec.network is not None else "")),
    ):  # fmt: skip
        key.add(label, value)
    return key.hexdigest()[:16]


def _listed(modules: tuple[str, ...], shown: int = 4) -> str:
    """``numpy, json, pathlib, subprocess and 15 more``: a progress line stays one line."""
    if len(modules) <= shown + 1:
        return ", ".join(modules)
    return f"{', '.join(modules[:shown])} and {len(modules) - shown} more"


def template_dir(name: str, spec: SandboxSpec) -> Path:
    if name == DEFAULT:
        return templates_root() / f"{DEFAULT}-{default_key(spec)}"
    return templates_root() / check_name(name)


def build(
    name: str = DEFAULT,
    spec: SandboxSpec | None = None,
    *,
    progress: Progress | None = None,
    extra_meta: dict[str, Any] | None = None,
    force: bool = False,
) -> Template:
    """Boot the image, preload, wait for the warm agent, snapshot it into the cache.

    A build that waited for the lock looks again before it starts: the build it waited for
    may have made the very template it wants (a second ``ember template build``, two first
    ``Sandbox()`` calls), and a template build takes minutes here. ``force`` builds anyway.
    """
    spec = spec or SandboxSpec()
    progress = progress or Progress(quiet=True)
    final = template_dir(name, spec)
    preload = resolve_preload(spec)
    with build_lock(f"template-{final.name}"):
        if not force and is_current(final, spec):
            verify(final)
            return Template(name, final, read_meta(final))
        staging = staging_dir(final)
        try:
            with progress.step(f"template {name}: boot the guest"):
                vmm = VmmProcess(spec)
            try:
                if preload:
                    with progress.step(f"template {name}: import {_listed(preload)} in the guest"):
                        check_preload(vmm, name, preload)
                with progress.step(f"template {name}: warm the agent"):
                    client = wait_warm(vmm)
                with progress.step(f"template {name}: snapshot"):
                    timings = vmm.snapshot(staging, durable=True)
                client.close()
            finally:
                vmm.close()
            with progress.step(f"template {name}: record a restored sandbox's first call"):
                prefault_pages, exec_pages, huge_chunks = template_prefault.record(
                    staging, spec, name
                )
            meta = {
                "name": name, "created": time.time(), "from": "image", "snapshot": timings,
                "network": spec.network is not None, "inputs": default_key(spec),
                "rootfs": str(resolve_images(spec)[1]), "preload": list(preload),
                "pool": spec.pool, "heap_mib": spec.heap_mib,  # None: the agent's defaults
                "prefault_pages": prefault_pages, "prefault_exec_pages": exec_pages,  # per exec
                "huge_chunks": huge_chunks,
                **(extra_meta or {}),
            }  # fmt: skip
            (staging / META_FILE).write_text(json.dumps(meta))
            install(staging, final)
        except BaseException:
            remove_tree(staging)
            raise
    return Template(name, final, meta)


def package_spec_for(spec: SandboxSpec, packages: PackageSpec, preload: list[str]) -> SandboxSpec:
    """``spec`` booting the image with ``packages`` (its path; built or not) and preloading
    numpy plus ``preload``."""
    from ember.images import rootfs
    from ember.images.packages import preload_for

    image = rootfs.image_path(packages) if not packages.empty() else None
    return replace(spec, rootfs=image, preload=preload_for(preload))


def build_with_packages(
    name: str,
    spec: SandboxSpec,
    packages: PackageSpec,
    preload: list[str],
    *,
    progress: Progress,
    force_packages: bool = False,
) -> Template:
    """``ember template build NAME --pip ... --apt ... --preload ...``: build (or find) the
    root file system with ``packages``, check the preload modules import in its tree on the
    host, then boot, preload, warm and snapshot it as template ``name``."""
    from ember.images import layers, rootfs

    if name == DEFAULT:
        raise ConfigError(
            "the default template's packages are fixed (numpy): give the template a name, "
            "e.g. `ember template build sci --pip pandas`"
        )
    check_name(name)
    wanted = packages if not packages.empty() else None
    rootfs.build_image(packages=wanted, force_packages=force_packages, progress=progress)
    full = package_spec_for(spec, packages, preload)
    if full.preload:
        inputs = rootfs.ImageInputs.current(wanted)
        lowers = rootfs.layer_paths(inputs)
        if not all(p.is_dir() for p in lowers):  # the image was cached, a layer was removed
            lowers = rootfs.build_layers(inputs, progress)
        log = build_root() / f"template-{name}.log"
        layers.check_imports(lowers, full.preload, progress, log)
    return build(name, full, progress=progress, extra_meta={"packages": packages.describe()},
                 force=force_packages)  # fmt: skip


def save_from(vmm: VmmProcess, name: str) -> Template:
    """``sb.snapshot(NAME)``: the sandbox as it is now becomes template NAME."""
    final = templates_root() / check_name(name)
    with build_lock(f"template-{final.name}"):
        staging = staging_dir(final)
        timings = vmm.snapshot(staging, durable=True)
        meta = {
            "name": name, "created": time.time(), "from": "sandbox", "snapshot": timings,
            "network": vmm.network is not None,
        }  # fmt: skip
        (staging / META_FILE).write_text(json.dumps(meta))
        install(staging, final)
    return Template(name, final, meta)


def find(name: str = DEFAULT, spec: SandboxSpec | None = None) -> Template:
    """The template to restore; the default one is built on first use."""
    spec = spec or SandboxSpec()
    directory = template_dir(name, spec)
    if not (directory / STATE_FILE).is_file():
        if name != DEFAULT:
            raise ConfigError(
                f"no template {name!r}: make one with `ember template build {name}` "
                f"or sb.snapshot({name!r})"
            )
        print("ember: building the default sandbox template (once per image)...", file=sys.stderr)
        return build(DEFAULT, spec)
    meta = read_meta(directory) or {"name": name}
    verify(directory)
    return Template(name, directory, meta)


def is_current(directory: Path, spec: SandboxSpec) -> bool:
    """A template made from an image is current when its recorded inputs' key is ours; one
    saved from a sandbox (``sb.snapshot``) records none and is kept as it is."""
    if not (directory / STATE_FILE).is_file():
        return False
    recorded = read_meta(directory).get("inputs")
    return recorded is None or recorded == default_key(spec)


def read_meta(directory: Path) -> dict[str, Any]:
    """A template's ``template.json``; empty when missing or unreadable."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def verify(directory: Path) -> None:
    """Refuse a template whose state or memory file does not match its checksums.

    Hashing the memory file costs ~0.25 s, which every new process (``ember run``) would pay
    before its first sandbox. So a good check is remembered in the process and on disk
    (``verified.json``: the files' inode, size, mtime and ctime, which any write to them
    changes); a file that changed since is hashed again.
    """
    state_path = directory / STATE_FILE
    memory = directory / MEMORY_FILE
    stamps = (stamp(state_path), stamp(memory))
    if None in stamps:
        raise SnapshotError(f"template {directory} has no state or memory file")
    identity = [list(s) for s in stamps if s is not None]  # as verified.json holds it
    key = (str(directory), json.dumps(identity))
    with _verify_lock:
        if key in _verified:
            return
        if _read_verified(directory) == identity:
            _verified.add(key)
            return
        state = read_state(state_path)
        expected = state.get("memory", {}).get("sha256")
        if expected is not None:
            try:
                actual = memory_digest(memory)
            except OSError as exc:
                raise SnapshotError(f"cannot read {memory}: {exc.strerror}") from None
            if actual != expected:
                raise SnapshotError(
                    f"template {directory.name} is corrupted: {memory} does not match its "
                    "checksum; rebuild it (ember template build)"
                )
        _verified.add(key)
        try:
            (directory / VERIFIED_FILE).write_text(json.dumps(identity))
        except OSError:
            pass  # a read-only template: verified again by the next process


def _read_verified(directory: Path) -> list[list[int]] | None:
    try:
        value = json.loads((directory / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, list) else None


def list_templates() -> list[Template]:
    root = templates_root()
    found: list[Template] = []
    if not root.is_dir():
        return found
    for directory in sorted(root.iterdir()):
        if (directory / STATE_FILE).is_file():
            meta = read_meta(directory)
            found.append(Template(str(meta.get("name", directory.name)), directory, meta))
    return found


def start_vmm(spec: SandboxSpec, *, template: str | None, boot: bool) -> VmmProcess:
    """A new sandbox VM: restored from a template (the default), or cold-booted; a process
    out of file descriptors anywhere on the way gets the one error that says so."""
    with descriptors_checked():
        return _start_vmm(spec, template=template, boot=boot)


def _start_vmm(spec: SandboxSpec, *, template: str | None, boot: bool) -> VmmProcess:
    if boot:
        if template is not None:
            raise ConfigError("boot=True boots the image; it cannot also restore a template")
        return VmmProcess(spec)
    found = find(template or DEFAULT, spec)
    has_net = bool(found.meta.get("network", False))
    if has_net != (spec.network is not None):
        raise ConfigError(
            f"template {found.name!r} was made "
            + ("with a network: pass network= to restore it" if has_net else "without a network")
            + ("" if has_net else ": make a networked one (network= when you snapshot)")
        )
    return VmmProcess(spec, restore=found.dir, template=True)

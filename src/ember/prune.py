"""``ember image prune``: delete cached images and templates nothing current can use.

A module of its own above ``ember.images`` and ``ember.templates``: it needs both.

Why: every input of a guest image is part of its cache key (``ember.images.cache``), so each
change of the kernel patches, ``ember-init``, the agent or the package layer builds new
directories next to the old ones and never deletes those. Here one upgrade of Ember leaves
~300 MiB of root file system and ~150 MiB per default template behind.

What stays:

- the artifacts of the current inputs: the kernel and initramfs of their current keys, the
  default root file system, its debootstrapped base and its layers, and every package layer
  built over a layer that stays (the rebuild cache of ``ember template build --pip``);
- every named template (``ember template build NAME``, ``sb.snapshot(NAME)``: a user's,
  removed with ``ember template rm``), and every cached file its snapshot refers to (its
  root file system and disks: a restore attaches them);
- a default template whose directory is the one its own shape (guest RAM, vCPUs, CPU
  template, network) maps to now (:func:`ember.templates.template_dir`).

Everything else under the kinds listed in :data:`KINDS` goes. An entry being built (its
build lock held) is left alone, and so are its ``.tmp`` staging directory and an ``.old.PID``
directory a rebuild is replacing. Without the lock held those are what a build killed
half-way left (a staging directory is only ever reused by a build of the same key, which
may never come again): they go too. A sandbox restored from a
template that goes keeps running (its memory file and disk stay open until it closes).
Nothing is guessed: when the current inputs cannot be resolved (images not built), the prune
refuses rather than treat everything as stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import BuildError, ConfigError, ImageNotBuilt
from ember.images import cache, initrd, kernel_build, layers, rootfs

__all__ = ["KINDS", "Entry", "prune", "stale"]

KINDS = ("kernel", "initrd", "rootfs", "rootfs-base", "rootfs-layer")
DEFAULT_PREFIX = "default-"


@dataclass(frozen=True)
class Entry:
    """One cached directory that nothing current uses."""

    path: Path
    kind: str  # one of KINDS, or "template"
    size: int  # bytes allocated on disk


def stale() -> list[Entry]:
    """What :func:`prune` would delete, biggest first; nothing is changed."""
    keep = _current_artifacts()
    found: list[Entry] = []
    # Templates first: the images and layers they restore from join ``keep``.
    listed = [("template", _templates_root())]
    listed += [(kind, cache.cache_root() / kind) for kind in KINDS]
    for kind, directory in listed:
        for path in _entries(directory):
            if _built_name(path.name) is not None:  # a staging or half-replaced directory
                gone = _abandoned(Entry(path, kind, 0))
            elif kind == "template":
                gone = not _template_is_kept(path)
                if not gone:
                    keep |= _referenced(path)
            else:
                gone = path not in keep and not (kind == "rootfs-layer" and _over_kept(path, keep))
            if gone:
                found.append(Entry(path, kind, _size(path)))
    return sorted(found, key=lambda entry: entry.size, reverse=True)


def prune(*, dry_run: bool = False) -> list[Entry]:
    """Delete what :func:`stale` finds (skipping any entry a build holds); what went."""
    removed = []
    for entry in stale():
        if dry_run:
            removed.append(entry)
            continue
        with _unless_building(entry) as free:
            if free:
                cache.remove_tree(entry.path)
                removed.append(entry)
    return removed


def _templates_root() -> Path:
    from ember.templates import templates_root

    return templates_root()


def _current_artifacts() -> set[Path]:
    """The directories the current inputs map to (layers added by :func:`_over_kept`)."""
    try:
        image = rootfs.ImageInputs.current()
        keep = {
            cache.artifact_dir("kernel", kernel_build.KernelInputs.current(None).key()),
            cache.artifact_dir("initrd", initrd.InitrdInputs.current().key()),
            cache.artifact_dir("rootfs", image.key()),
            cache.artifact_dir("rootfs-base", image.base.key()),
        }
    except (BuildError, ImageNotBuilt) as exc:
        raise ConfigError(
            f"cannot tell which cached images are current ({exc}): nothing was removed"
        ) from None
    return keep | {layers.layer_dir(layer) for layer in image.layers}


def _entries(directory: Path) -> Iterator[Path]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    for name in names:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            yield path


def _built_name(name: str) -> str | None:
    """The entry a staging (``NAME.tmp``, :func:`ember.images.cache.staging_dir`) or
    half-replaced (``NAME.old.PID``, :func:`ember.images.cache.install`) directory is
    for; None for a finished entry."""
    if name.endswith(".tmp"):
        return name.removesuffix(".tmp")
    head, old, pid = name.rpartition(".old.")
    return head if old and pid.isdigit() else None


def _template_is_kept(path: Path) -> bool:
    if not path.name.startswith(DEFAULT_PREFIX):
        return True  # a named template: the user's to remove
    config = _state_config(path)
    if config is None:
        return False  # no readable snapshot: nothing can restore it
    from ember.network.policy import NetworkPolicy
    from ember.spec import SandboxSpec
    from ember.templates import DEFAULT, template_dir

    try:
        spec = SandboxSpec(
            mem_mib=int(config["mem_mib"]), vcpus=int(config["vcpus"]),
            cpu_template=str(config["cpu_template"]),
            network=NetworkPolicy([]) if config.get("net") else None,
        )  # fmt: skip
        return template_dir(DEFAULT, spec) == path
    except (KeyError, TypeError, ValueError, ConfigError):
        return False


def _state_config(path: Path) -> dict[str, Any] | None:
    from ember.snapshot import STATE_FILE
    from ember.snapshot.format import read_state

    try:
        config = read_state(path / STATE_FILE).get("config")
    except Exception:  # a damaged or foreign state file: the template is unusable
        return None
    return config if isinstance(config, dict) else None


def _referenced(template: Path) -> set[Path]:
    """The cache directories a kept template's snapshot and metadata name (``<kind>/<key>``)."""
    texts: list[Any] = [_state_config(template)]
    with contextlib.suppress(OSError, ValueError):
        texts.append(json.loads((template / "template.json").read_text()))
    root = cache.cache_root()
    found = set()
    for text in _strings(texts):
        path = Path(text)
        if path.is_absolute() and path.is_relative_to(root):
            parts = path.relative_to(root).parts
            if len(parts) >= 2 and parts[0] in KINDS:
                found.add(root / parts[0] / parts[1])
    return found


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _over_kept(layer: Path, keep: set[Path]) -> bool:
    """A package layer whose chain of parent layers reaches a kept one. A layer right over
    a base is a default layer: it stays only as part of the current chain (``keep``)."""
    seen: set[Path] = set()
    while layer not in seen:
        seen.add(layer)
        try:
            parent = json.loads((layer / layers.META_FILE).read_text())["parent"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not isinstance(parent, str) or not parent or "/" in parent or parent[0] == ".":
            return False
        above = cache.cache_root() / layers.LAYER_KIND / parent
        if above in keep:
            return True
        layer = above
    return False  # a loop: not something a build makes


def _size(path: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def _lock_path(entry: Entry) -> Path:
    """The build lock of the entry (or of the entry its staging directory is for)."""
    name = _built_name(entry.path.name) or entry.path.name
    name = f"template-{name}" if entry.kind == "template" else name
    return cache.build_root() / f"{name}.lock"


def _abandoned(entry: Entry) -> bool:
    """A staging or half-replaced directory whose build is over: its lock file exists
    (every build that makes one opens it first, so a directory without one is not a build's
    and stays) and no build holds it."""
    if not _lock_path(entry).is_file():
        return False
    with _unless_building(entry) as free:
        return free


@contextlib.contextmanager
def _unless_building(entry: Entry) -> Iterator[bool]:
    """Hold the entry's build lock while it is deleted; False if a build holds it now."""
    try:
        lock = open(_lock_path(entry))  # noqa: SIM115 - closed below
    except OSError:
        yield True  # never built here (or its lock is gone): no build holds it
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

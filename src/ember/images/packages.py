"""What goes into a package layer of the root file system, and its cache key.

A template with packages (``ember template build sci --pip pandas --apt jq``)
runs on a root file system made of layers: the debootstrapped base tree, the
default layer (numpy, which every sandbox has), then one layer with the
template's own packages. Each layer is cached under ``<cache>/rootfs-layer/<key>``
where the key hashes the layer below it and everything that decides what
gets installed:

- ``--pip`` requirement strings (sorted: pip's resolver does not care about
  their order), and for a local wheel, sdist or project directory its bytes,
  so a rebuilt wheel of the same name is a new layer;
- the *contents* of each ``--requirements`` file (its name does not matter;
  local paths inside it are not followed);
- ``--apt`` package names (sorted).

Unpinned requirements resolve when the layer is first built and stay as they
were until ``--force``: the key is of what was asked for, not of what PyPI
serves today. Pin versions for reproducible templates.

The default layer pins numpy below 2.4: numpy 2.4 raised its x86 baseline to
x86-64-v2, whose CMPXCHG16B and POPCNT the ``pvm`` CPU template hides from the
guest (the emulated guest kernel cannot run them), so 2.4's import refuses to
run there. Every template pre-imports it, with the standard library modules programs use
most (:data:`DEFAULT_PRELOAD`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from ember.errors import ConfigError
from ember.images import cache

LAYER_RECIPE: Final = "1"
DEFAULT_PIP: Final = ("numpy==2.3.5",)
# What every template's interpreters import before the snapshot besides numpy: the standard
# library modules programs import most, each of which costs a new guest python3 0.1-0.8 s here
# (json 0.26 s, pathlib 0.58, zipfile 0.76: reading and unmarshalling their code, their C
# extensions' mappings and relocations, all through the emulated kernel), and nothing once
# it is in the template: asyncio 3.2 s (ssl with it), http.client 1.4 s, sqlite3 1.1 s,
# importlib.metadata 0.9 s. Importing OpenSSL's TLS library or SQLite seeds neither's
# generator (each draws from the kernel at its first use, in the sandbox: a test checks that
# siblings draw different bytes). Two draw or read something at import that a program must
# not inherit from the template: multiprocessing's authkey (os.urandom; replaced at every
# hand-over, pybase._reseed) and zoneinfo's PYTHONTZPATH (read again when a job's differs).
# Then 0.2-0.9 s each: multiprocessing with its pool, concurrent.futures' process pool,
# zoneinfo, http.server, tarfile.
STDLIB_PRELOAD: Final = (
    "json", "pathlib", "subprocess", "dataclasses", "argparse", "logging", "csv", "decimal",
    "fractions", "statistics", "glob", "gzip", "zipfile", "tempfile", "shlex", "queue",
    "pprint", "difflib",
    "asyncio", "ssl", "http.client", "urllib.request", "sqlite3", "importlib.metadata", "uuid",
    "xml.etree.ElementTree", "html.parser", "unittest", "tomllib", "configparser",
    "multiprocessing", "multiprocessing.pool", "concurrent.futures.process", "zoneinfo",
    "http.server", "tarfile",
)  # fmt: skip
DEFAULT_PRELOAD: Final = ("numpy", *STDLIB_PRELOAD)
# Debian package names (policy 5.6.1), and a Python module path for --preload.
_APT_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_MODULE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_LOCAL_SUFFIXES: Final = (".whl", ".tar.gz", ".zip", ".tar.bz2", ".tgz")
_SKIP_DIRS: Final = frozenset({".git", "__pycache__", "build", "dist", ".venv", ".tox"})


def is_local(requirement: str) -> bool:
    """Whether a ``--pip`` argument names a file or directory on the host (not a PyPI name)."""
    if "://" in requirement or "@" in requirement:
        return False  # a direct URL reference (name @ https://...) is pip's business
    return (
        requirement.startswith((".", "/", "~"))
        or os.sep in requirement
        or requirement.endswith(_LOCAL_SUFFIXES)
    )


def _digest_path(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative names and bytes)."""
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    for dirpath, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            full = Path(dirpath, name)
            rel = str(full.relative_to(path)).encode()
            h.update(len(rel).to_bytes(8, "little") + rel)
            h.update(_digest_path(full).encode())
    return h.hexdigest()


def check_modules(modules: Iterable[str]) -> tuple[str, ...]:
    """``--preload`` names, checked to be module paths (they travel comma-separated)."""
    out: list[str] = []
    for name in modules:
        if not _MODULE.match(name):
            raise ConfigError(f"--preload {name!r}: not a Python module name (e.g. numpy, a.b)")
        if name not in out:
            out.append(name)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class PackageSpec:
    """The packages a template asks for, as given on the command line."""

    pip: tuple[str, ...] = ()
    requirements: tuple[Path, ...] = ()
    apt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.apt:
            if not _APT_NAME.match(name):
                raise ConfigError(f"--apt {name!r}: not a Debian package name")
        for req in self.requirements:
            if not req.is_file():
                raise ConfigError(f"--requirements {req}: no such file")
        for spec in self.pip:
            if not spec.strip() or spec.startswith("-"):
                raise ConfigError(f"--pip {spec!r}: give a requirement (name, name==1.2, a path)")
            if is_local(spec) and not Path(spec).expanduser().exists():
                raise ConfigError(f"--pip {spec}: no such file or directory")

    def empty(self) -> bool:
        return not (self.pip or self.requirements or self.apt)

    def describe(self) -> dict[str, list[str]]:
        """For template metadata and ``ember template ls``."""
        return {
            "pip": list(self.pip),
            "requirements": [str(r) for r in self.requirements],
            "apt": list(self.apt),
        }


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """One layer: what to install over the layer whose key is ``parent``.

    ``pip`` holds PyPI requirement strings; ``local`` the absolute host paths
    of local wheels, sdists or project directories with their digests;
    ``requirements`` the requirements files' contents.
    """

    parent: str
    pip: tuple[str, ...] = ()
    local: tuple[tuple[Path, str], ...] = ()
    requirements: tuple[bytes, ...] = ()
    apt: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, parent: str, spec: PackageSpec) -> LayerInputs:
        pip = sorted({s.strip() for s in spec.pip if not is_local(s)})
        paths = sorted({Path(s).expanduser().resolve() for s in spec.pip if is_local(s)})
        return cls(
            parent=parent,
            pip=tuple(pip),
            local=tuple((path, _digest_path(path)) for path in paths),
            requirements=tuple(r.read_bytes() for r in spec.requirements),
            apt=tuple(sorted(set(spec.apt))),
        )

    def key(self) -> str:
        h = cache.KeyHasher("ember-rootfs-layer")
        h.add("recipe", LAYER_RECIPE)
        h.add("parent", self.parent)
        for requirement in self.pip:
            h.add("pip", requirement)
        for path, digest in self.local:
            # the name matters too: a wheel's file name carries its version and tags
            h.add("local", f"{path.name}\0{digest}")
        for text in self.requirements:
            h.add("requirements", text)
        for name in self.apt:
            h.add("apt", name)
        return h.hexdigest()

    def wants_pip(self) -> bool:
        return bool(self.pip or self.local or self.requirements)

    def summary(self) -> str:
        """A short human description: ``numpy==2.3.5, ./x.whl, -r (1), apt jq``."""
        parts = [*self.pip, *(p.name for p, _ in self.local)]
        parts += [f"-r ({len(self.requirements)} file)"] if self.requirements else []
        parts += [f"apt {' '.join(self.apt)}"] if self.apt else []
        return ", ".join(parts) or "nothing"


def default_layer(base_key: str) -> LayerInputs:
    """The layer every sandbox has (numpy), over the debootstrapped base."""
    return LayerInputs(parent=base_key, pip=DEFAULT_PIP)


def layer_chain(base_key: str, spec: PackageSpec | None) -> tuple[LayerInputs, ...]:
    """The layers of a root file system, bottom first: the default one, then ``spec``'s."""
    layers = [default_layer(base_key)]
    if spec is not None and not spec.empty():
        layers.append(LayerInputs.from_spec(layers[-1].key(), spec))
    return tuple(layers)


def preload_for(extra: Sequence[str]) -> tuple[str, ...]:
    """What a template's interpreters import before its snapshot: :data:`DEFAULT_PRELOAD`,
    then ``extra``."""
    return check_modules([*DEFAULT_PRELOAD, *extra])

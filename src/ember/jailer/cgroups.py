"""One cgroup per sandbox VMM: CPU, memory and process-count quotas, usage, clean removal.

Why a cgroup per VMM (DESIGN.md §2): a guest that spins its vCPUs, balloons
its RAM or fork-bombs its VMM must only ever hurt its own sandbox.  The group
also gives an exact ledger (CPU seconds, peak memory, OOM kills) and a
reliable "kill everything this sandbox started" on removal.

Both layouts are handled:

- cgroup v2 (``<root>/cgroup.controllers`` exists): one directory; the
  controllers the quotas need are switched on in the parent's
  ``cgroup.subtree_control`` when the parent allows it;
- cgroup v1: one directory per controller hierarchy (``cpu``, ``cpuacct``,
  ``memory``, ``pids``; co-mounted hierarchies share one directory).

Groups are made *below the current process's own cgroup* in each hierarchy
(read from ``/proc/self/cgroup``), so Ember works inside a container or a
delegated subtree, not only at the root.  ``root`` and ``self_cgroup`` are
parameters so the unit tests can run against a fake tree.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ConfigError, SandboxError, require_whole_number

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
CPU_PERIOD_US = 100_000
MIN_MEMORY_MIB = 64
MIN_PIDS = 8
MAX_PIDS = 1 << 22  # PID_MAX_LIMIT on 64-bit: pids.max refuses more (EINVAL)
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
_REMOVE_TIMEOUT = 5.0
_HOWTO = "run as root or delegate a cgroup to this user"


@dataclass(frozen=True)
class Quotas:
    """Limits for one sandbox's VMM process tree; ``None`` means unlimited.

    ``cpus`` is in CPUs (0.25 = a quarter of one CPU per wall second, enforced
    by the CFS bandwidth controller), ``memory_mib`` caps RAM with swap off (a
    guest must not escape its limit by paging out), ``pids`` caps processes
    and threads.  Validated here so bad input fails before anything is made.
    """

    cpus: float | None = None
    memory_mib: int | None = None
    pids: int | None = None

    def __post_init__(self) -> None:
        if self.memory_mib is not None:
            require_whole_number("memory_mib", self.memory_mib)
        if self.pids is not None:
            require_whole_number("pids", self.pids)
        if self.cpus is not None and (
            not isinstance(self.cpus, int | float) or isinstance(self.cpus, bool)
        ):
            raise ConfigError(f"cpus must be a number of CPUs, not {self.cpus!r}")
        ncpu = os.cpu_count() or 1
        if self.cpus is not None and not 0 < self.cpus <= ncpu:
            raise ConfigError(f"cpus must be > 0 and at most {ncpu} (this host's CPUs), "
                              f"not {self.cpus}")  # fmt: skip
        if self.memory_mib is not None and self.memory_mib < MIN_MEMORY_MIB:
            raise ConfigError(f"memory_mib must be at least {MIN_MEMORY_MIB} MiB, "
                              f"not {self.memory_mib}")  # fmt: skip
        if self.pids is not None and not MIN_PIDS <= self.pids <= MAX_PIDS:
            raise ConfigError(
                f"pids must be from {MIN_PIDS} to {MAX_PIDS} (the kernel's most; leave it "
                f"unset for no limit), not {self.pids}"
            )

    def any(self) -> bool:
        return self.cpus is not None or self.memory_mib is not None or self.pids is not None

    def controllers(self) -> set[str]:
        """The v2 controllers these quotas cannot be enforced without."""
        needed = set()
        if self.cpus is not None:
            needed.add("cpu")
        if self.memory_mib is not None:
            needed.add("memory")
        if self.pids is not None:
            needed.add("pids")
        return needed


# Indirections the unit tests replace to imitate the kernel (which fills a new
# cgroup directory with control files, and lets rmdir remove it with them).
def _make_dir(path: Path) -> None:
    path.mkdir()


def _remove_dir(path: Path) -> None:
    path.rmdir()


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, value: str) -> None:
    """Write a control file; no O_CREAT, since a missing file means a missing controller."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _own_paths(self_cgroup: Path) -> tuple[str | None, dict[str, str]]:
    """This process's cgroup: (the v2 path, {v1 controller: path}) from /proc/self/cgroup."""
    v2: str | None = None
    v1: dict[str, str] = {}
    try:
        text = _read(self_cgroup)
    except OSError:
        return None, {}
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and not controllers:
            v2 = path
        for name in controllers.split(","):
            if name:
                v1[name] = path
    return v2, v1


def _below(mount: Path, rel: str) -> Path:
    """``mount/rel``, or ``mount`` itself when ``rel`` is a host path not visible here
    (a container without a cgroup namespace sees its own group as the mount's root)."""
    path = mount / rel.lstrip("/")
    return path if path.is_dir() else mount


def _v1_mount(root: Path, controller: str) -> Path | None:
    direct = root / controller
    if direct.is_dir():
        return direct.resolve()
    with contextlib.suppress(OSError):
        for entry in sorted(root.iterdir()):  # e.g. "cpu,cpuacct" without its symlinks
            if controller in entry.name.split(",") and entry.is_dir():
                return entry.resolve()
    return None


def _unavailable(what: str, exc: OSError | None = None) -> ConfigError:
    detail = f" ({exc.strerror})" if exc is not None and exc.strerror else ""
    return ConfigError(f"cannot set sandbox quotas: {what}{detail}; {_HOWTO}")


class SandboxCgroup:
    """A live cgroup (one directory on v2, one per hierarchy on v1) holding one VMM."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        self._dirs = dirs  # v2: {"": dir}; v1: {controller: dir}
        unique: list[Path] = []
        for d in dirs.values():
            if d not in unique:
                unique.append(d)
        self.paths: tuple[Path, ...] = tuple(unique)
        # Pre-encoded so join_self can run between fork and exec without allocating much.
        self._procs = tuple(os.fsencode(d / "cgroup.procs") for d in unique)
        self._removed = False

    @property
    def path(self) -> Path:
        """The main directory (v2: the group; v1: the cpu hierarchy's group)."""
        return self._dirs.get("", self._dirs.get("cpu", self.paths[0]))

    # --- creation
    @classmethod
    def create(
        cls,
        name: str,
        quotas: Quotas,
        *,
        root: Path = CGROUP_ROOT,
        self_cgroup: Path = SELF_CGROUP,
    ) -> SandboxCgroup:
        """Make the group ``name`` under this process's cgroup and apply ``quotas``.

        Raises ConfigError when cgroups are missing or not writable here, or a
        quota's controller is not available; nothing is left behind then.
        """
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"bad cgroup name {name!r}")
        if (root / "cgroup.controllers").is_file():
            group = cls._create_v2(name, quotas, root, self_cgroup)
        elif root.is_dir() and any(_v1_mount(root, c) for c in V1_CONTROLLERS):
            group = cls._create_v1(name, quotas, root, self_cgroup)
        else:
            raise _unavailable(f"no cgroup file system at {root}")
        try:
            group._apply(quotas)
        except BaseException:
            group.remove()
            raise
        return group

    @classmethod
    def _create_v2(cls, name: str, quotas: Quotas, root: Path, self_cgroup: Path) -> SandboxCgroup:
        own, _ = _own_paths(self_cgroup)
        parent = _below(root, own or "/")
        try:
            available = set(_read(parent / "cgroup.controllers").split())
            enabled = set(_read(parent / "cgroup.subtree_control").split())
        except OSError as exc:
            raise _unavailable(f"cannot read the cgroup {parent}", exc) from None
        missing = quotas.controllers() - available
        if missing:
            raise _unavailable(f"the cgroup {parent} lacks the {', '.join(sorted(missing))} "
                               "controller(s)")  # fmt: skip
        for ctrl in sorted(({"cpu", "memory", "pids"} & available) - enabled):
            # Best effort for the optional ones: a parent that holds processes
            # itself (the "no internal processes" rule) refuses with EBUSY.
            with contextlib.suppress(OSError):
                _write(parent / "cgroup.subtree_control", f"+{ctrl}")
        path = parent / name
        try:
            _make_dir(path)
        except OSError as exc:
            raise _unavailable(f"cannot create {path}", exc) from None
        group = cls(2, {"": path})
        missing = quotas.controllers() - set(_read(path / "cgroup.controllers").split())
        if missing:
            group.remove()
            raise _unavailable(
                f"{parent}/cgroup.subtree_control does not enable "
                f"{', '.join(sorted(missing))} (a non-root cgroup that holds processes "
                "cannot delegate controllers: start Ember in a leaf of a delegated subtree)"
            )
        return group

    @classmethod
    def _create_v1(cls, name: str, quotas: Quotas, root: Path, self_cgroup: Path) -> SandboxCgroup:
        _, own = _own_paths(self_cgroup)
        mounts = {c: m for c in V1_CONTROLLERS if (m := _v1_mount(root, c)) is not None}
        wanted = {"cpu": quotas.cpus, "memory": quotas.memory_mib, "pids": quotas.pids}
        missing = [c for c, q in wanted.items() if q is not None and c not in mounts]
        if missing:
            raise _unavailable(f"no cgroup v1 {', '.join(missing)} hierarchy under {root}")
        dirs: dict[str, Path] = {}
        made: dict[Path, Path] = {}  # mount -> group dir: co-mounted hierarchies share one
        try:
            for ctrl, mount in mounts.items():
                if mount not in made:
                    path = _below(mount, own.get(ctrl, "/")) / name
                    try:
                        _make_dir(path)
                    except OSError as exc:
                        raise _unavailable(f"cannot create {path}", exc) from None
                    made[mount] = path
                dirs[ctrl] = made[mount]
        except BaseException:
            cls(1, dirs).remove()
            raise
        return cls(1, dirs)

    def _apply(self, q: Quotas) -> None:
        try:
            if self.version == 2:
                d = self.path
                if q.cpus is not None:
                    _write(d / "cpu.max", f"{round(q.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
                if q.memory_mib is not None:
                    _write(d / "memory.max", str(q.memory_mib << 20))
                    if (d / "memory.swap.max").exists():
                        _write(d / "memory.swap.max", "0")
                if q.pids is not None:
                    _write(d / "pids.max", str(q.pids))
                return
            if q.cpus is not None:
                cpu = self._dirs["cpu"]
                _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(round(q.cpus * CPU_PERIOD_US)))
            if q.memory_mib is not None:
                mem = self._dirs["memory"]
                _write(mem / "memory.limit_in_bytes", str(q.memory_mib << 20))
                if (mem / "memory.memsw.limit_in_bytes").exists():  # RAM+swap = RAM: no swap
                    _write(mem / "memory.memsw.limit_in_bytes", str(q.memory_mib << 20))
            if q.pids is not None:
                _write(self._dirs["pids"] / "pids.max", str(q.pids))
        except OSError as exc:
            raise _unavailable(f"cannot write the quotas of {self.path}", exc) from None

    # --- membership
    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group, in every hierarchy."""
        for procs in self._procs:
            _write(Path(os.fsdecode(procs)), str(pid))

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes itself into to join (one per hierarchy)."""
        return [os.fsdecode(p) for p in self._procs]

    def join_self(self) -> None:
        """Move the calling process in: meant as a ``preexec_fn``, so the VMM is
        confined from its first instruction with no window for escape.  Only
        raw os calls on pre-encoded paths, nothing that takes a Python lock."""
        for procs in self._procs:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    def pids(self) -> list[int]:
        found: list[int] = []
        for procs in self._procs:
            with contextlib.suppress(FileNotFoundError):
                found.extend(int(p) for p in _read(Path(os.fsdecode(procs))).split())
        return sorted(set(found))

    # --- accounting
    def cpu_usage_seconds(self) -> float:
        """CPU time (user + system) used by everything that ever ran in the group."""
        if self.version == 2:
            for line in _read(self.path / "cpu.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            return 0.0
        acct = self._dirs.get("cpuacct")
        return int(_read(acct / "cpuacct.usage")) / 1e9 if acct is not None else 0.0

    def memory_peak_bytes(self) -> int | None:
        """The highest memory use seen, or None where the kernel does not track it."""
        return self._memory("memory.peak", "memory.max_usage_in_bytes")

    def memory_current_bytes(self) -> int | None:
        """The memory charged to the group now (host pages of the VMM and its guest)."""
        return self._memory("memory.current", "memory.usage_in_bytes")

    def _memory(self, v2_name: str, v1_name: str) -> int | None:
        d = self._dirs.get("" if self.version == 2 else "memory")
        name = v2_name if self.version == 2 else v1_name
        try:
            return int(_read(d / name)) if d is not None else None
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in the group (0 where not reported)."""
        d = self._dirs.get("" if self.version == 2 else "memory")
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = _read(d / name) if d is not None else ""
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    # --- removal
    def remove(self) -> None:
        """SIGKILL whatever is still inside, then delete the group.  Idempotent.

        Killing through the group (not the VMM's process group) also catches
        anything that changed its session.  rmdir is retried because a killed
        task leaves the group only once it has fully exited.
        """
        if self._removed or not self.paths:
            self._removed = True
            return
        deadline = time.monotonic() + _REMOVE_TIMEOUT
        kill_file = self.path / "cgroup.kill" if self.version == 2 else None
        while pids := self.pids():
            if kill_file is not None and kill_file.exists():
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        for d in reversed(self.paths):
            while True:
                try:
                    _remove_dir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise SandboxError(f"cannot remove the sandbox cgroup {d}: "
                                           f"{exc.strerror}") from None  # fmt: skip
                    time.sleep(0.01)
        self._removed = True

    def __repr__(self) -> str:
        return f"SandboxCgroup(v{self.version}, {self.path})"

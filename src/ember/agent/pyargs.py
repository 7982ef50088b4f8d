"""Which ``exec`` commands a pre-started interpreter may run, and how: ``python3``'s command line.

A pre-started interpreter (:mod:`ember.agent.pool`) has already done ``python3``'s start-up:
its flags are fixed, ``site`` has run, the environment it saw is the agent's. It may take a
job only when that start-up is indistinguishable from the one the job's own ``python3`` would
have done, or differs only in what :mod:`ember.agent.pystart` can set right afterwards. So this
module reads a command line exactly as CPython 3.11 does (``Python/getopt.c``,
``Python/initconfig.c``) and answers with a :class:`PyJob`, or ``None`` for "start a real
process", which is always correct, only slower. Honoured after start-up:

* ``-u`` / ``PYTHONUNBUFFERED`` (the standard streams are made again, unbuffered);
* ``-B`` / ``PYTHONDONTWRITEBYTECODE``, ``-s`` / ``PYTHONNOUSERSITE``, ``-E``, ``-I``,
  ``-P`` / ``PYTHONSAFEPATH``, ``-q`` (``sys.flags`` and what reads them);
* ``PYTHONPATH``, ``PYTHONIOENCODING``, ``PYTHONUSERBASE``, and the environment itself.

Anything else that start-up consumes (``-O``, ``-S``, ``-W``, ``-X``, ``-i``, ``-b``, ``-d``,
``-v``, ``-x``, ``PYTHONHASHSEED``, ``PYTHONWARNINGS``, ``PYTHONUTF8``, another locale, ...)
sends the job to a real process. Pure functions, no I/O: unit-tested on any host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.agent.heap import without_malloc_env
from ember.agent.simd import SIMD_ENV

__all__ = ["Mode", "PyJob", "effective_ctype", "parse_command", "plan"]

Mode = str  # "file" | "command" | "module" | "stdin"

# Flags that set only ``sys.flags`` fields (and what reads them at run time).
_HONOURED_FLAGS = frozenset("BEIPqsu")
# Flags python3 knows that a started interpreter cannot take back: a real process runs these.
_REFUSED_FLAGS = frozenset("bdhiJORSvVx?t")
_WITH_ARGUMENT = frozenset("cmWX")

# Read by python3 at start-up but honoured afterwards by pystart.
_HONOURED_ENV = frozenset(
    {
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONNOUSERSITE",
        "PYTHONSAFEPATH",
        "PYTHONIOENCODING",
        "PYTHONUSERBASE",
    }
)
# Read only later, at run time, by the code that uses them: nothing to do.
_RUNTIME_ENV = frozenset(
    {"PYTHONSTARTUP", "PYTHONBREAKPOINT", "PYTHONASYNCIODEBUG", "PYTHONCASEOK"}
)
# The pool's own variables that programs cannot observe (the allocator: ember.agent.heap).
_IGNORED_POOL_ENV = _RUNTIME_ENV | {"PYTHONMALLOC"}


@dataclass(frozen=True)
class Command:
    """A parsed ``python3`` command line (before the environment is considered)."""

    mode: Mode
    target: str  # the file, the -c code, the -m module, or "-"/"" for stdin
    argv: tuple[str, ...]  # what sys.argv starts as
    options: frozenset[str] = frozenset()  # honoured single-letter flags seen


@dataclass(frozen=True)
class PyJob:
    """Everything a pre-started interpreter needs to become this ``python3`` process."""

    mode: Mode
    target: str
    argv: tuple[str, ...]
    orig_argv: tuple[str, ...]
    unbuffered: bool
    flags: dict[str, int | bool] = field(default_factory=dict)  # sys.flags fields to change
    pythonpath: tuple[str, ...] = ()  # PYTHONPATH entries, made absolute by pystart
    io_encoding: str | None = None  # PYTHONIOENCODING as given
    no_user_site: bool = False
    safe_path: bool = False


def parse_command(argv: list[str]) -> Command | None:
    """``argv[1:]`` as python3 3.11 reads it; None if it uses an option a pool cannot honour."""
    options: set[str] = set()
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg.startswith("--"):
            return None  # --help, --version, --check-hash-based-pycs, ...: a real process
        j = 1
        while j < len(arg):
            letter = arg[j]
            if letter in _WITH_ARGUMENT:
                value = arg[j + 1 :]
                if not value:
                    i += 1
                    if i >= len(argv):
                        return None  # "Argument expected for the -c option": let python say it
                    value = argv[i]
                if letter == "c":
                    return Command("command", value, ("-c", *argv[i + 1 :]), frozenset(options))
                if letter == "m":
                    return Command("module", value, ("-m", *argv[i + 1 :]), frozenset(options))
                return None  # -W, -X
            if letter in _HONOURED_FLAGS:
                options.add(letter)
            else:
                return None  # refused, or unknown (python3 prints its usage and exits 2)
            j += 1
        i += 1
    rest = argv[i:]
    if not rest:
        return Command("stdin", "", ("",), frozenset(options))
    if rest[0] == "-":
        return Command("stdin", "-", tuple(rest), frozenset(options))
    return Command("file", rest[0], tuple(rest), frozenset(options))


def effective_ctype(env: dict[str, str]) -> str:
    """The LC_CTYPE locale a process started with ``env`` gets (what python3 decodes with)."""
    for name in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = env.get(name)
        if value:
            return value
    return "C"


def plan(
    argv: list[str], env: dict[str, str], *, pool_ctype: str, pool_env: dict[str, str]
) -> PyJob | None:
    """The job for a pre-started interpreter, or None when only a real ``python3`` will do.

    ``argv[0]`` must already be known to name the pool's interpreter; ``env`` is the job's
    full environment; ``pool_ctype``/``pool_env`` are what the pool interpreters started with.
    """
    command = parse_command(argv)
    if command is None or effective_ctype(env) != pool_ctype:
        return None
    opts = command.options
    isolated = "I" in opts
    ignore_env = isolated or "E" in opts
    seen = {} if ignore_env else {k: v for k, v in env.items() if k.startswith("PYTHON") and v}
    for name in seen:
        if name not in _HONOURED_ENV and name not in _RUNTIME_ENV:
            return None
    for name, value in pool_env.items():  # what the pool's own start-up consumed must match
        if name.startswith("PYTHON") and name not in _IGNORED_POOL_ENV and seen.get(name) != value:
            return None
    started = dict(pool_env)
    without_malloc_env(started)
    # read once, when the interpreter started (glibc) or imported its preload modules (numpy,
    # OpenBLAS): a program asking for other values needs a process of its own
    if any(env.get(name) != started.get(name) for name in SIMD_ENV):
        return None
    unbuffered = "u" in opts or "PYTHONUNBUFFERED" in seen
    no_bytecode = "B" in opts or "PYTHONDONTWRITEBYTECODE" in seen
    no_user_site = isolated or "s" in opts or "PYTHONNOUSERSITE" in seen
    safe_path = isolated or "P" in opts or "PYTHONSAFEPATH" in seen
    flags: dict[str, int | bool] = {}
    if no_bytecode:
        flags["dont_write_bytecode"] = 1
    if no_user_site:
        flags["no_user_site"] = 1
    if ignore_env:
        flags["ignore_environment"] = 1
    if isolated:
        flags["isolated"] = 1
    if safe_path:
        flags["safe_path"] = True
    if "q" in opts:
        flags["quiet"] = 1
    pythonpath = tuple(seen["PYTHONPATH"].split(":")) if "PYTHONPATH" in seen else ()
    return PyJob(
        mode=command.mode,
        target=command.target,
        argv=command.argv,
        orig_argv=tuple(argv),
        unbuffered=unbuffered,
        flags=flags,
        pythonpath=pythonpath,
        io_encoding=seen.get("PYTHONIOENCODING"),
        no_user_site=no_user_site,
        safe_path=safe_path,
    )

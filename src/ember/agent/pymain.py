"""Inside a pre-started interpreter: what ``python3``'s C start-up does with a program before
it runs it, redone for a job: the standard streams, ``PYTHONIOENCODING``, the importer of a
directory or zip file, the script read (or the error python3 prints when it cannot open it),
a relative path made absolute, stdin read whole.

Split from :mod:`ember.agent.pyjob`, which applies the job with these; each follows the C
function it names, so a program cannot tell them from python3's own.

Standard library only (it runs in the guest; see :mod:`ember.agent.pybase` for how).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # no run-time import: these files must not add to sys.modules
    from typing import Any


def _stdio(fd: int, write: bool, name: str, encoding: str, errors: str, unbuffered: bool) -> Any:
    """One standard stream as ``create_stdio`` in ``Python/pylifecycle.c`` (3.11) makes it."""
    import io

    buffering = 0 if (unbuffered and write) else -1
    buf: Any = io.open(fd, "wb" if write else "rb", buffering, None, None, None, False)  # noqa: SIM115, UP020
    raw = buf if buffering == 0 else buf.raw
    raw.name = name
    line_buffering = not unbuffered and (raw.isatty() or fd == 2)
    stream: Any = io.TextIOWrapper(buf, encoding, errors, "\n", line_buffering, unbuffered)
    stream.mode = "w" if write else "r"
    return stream


def _io_encoding(spec: str | None, encoding: str, errors: str) -> tuple[str, str]:
    """``PYTHONIOENCODING=enc[:errors]`` as ``config_init_stdio_encoding`` reads it."""
    if not spec:
        return encoding, errors
    import codecs  # imported by python3's start-up already

    enc, _, errs = spec.partition(":")
    if enc:
        encoding = codecs.lookup(enc).name
        if not errs:
            errs = "strict"
    if errs:
        errors = errs
    return encoding, errors


def _getimporter(path: str) -> Any:
    """``PyImport_GetImporter``: a directory or zip file is run as its ``__main__`` module."""
    cache = sys.path_importer_cache
    if path in cache:
        return cache[path]
    cache[path] = None  # as CPython caches it: a plain file has no importer
    for hook in sys.path_hooks:
        try:
            importer = hook(path)
        except ImportError:
            continue
        cache[path] = importer
        return importer
    return None


def _read_script(path: str) -> tuple[bytes | None, OSError | None, str | None, bool]:
    """(source, open error, real path, is a directory) in as few system calls as possible."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return None, exc, None, False
    try:
        import stat  # imported by python3's start-up already

        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return None, None, None, True
        parts = [os.read(fd, info.st_size + 1)]
        while len(parts[-1]) > 0 and (len(parts) > 1 or len(parts[0]) > info.st_size):
            parts.append(os.read(fd, 1 << 16))
        try:  # the kernel resolved every symlink already: one call, not an lstat per component
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real = os.path.realpath(path)
        return b"".join(parts), None, real, False
    except OSError as exc:
        return None, exc, None, False
    finally:
        os.close(fd)


def _job_script(
    path: str, given: list[Any] | None
) -> tuple[bytes | None, OSError | None, str | None, bool]:
    """:func:`_read_script`'s answer for a script the agent just wrote and handed over with
    the job (``[path, bytes, real path]``: ``ember.agent.execute.SCRIPT_HANDOVER_MAX``)."""
    if given is not None and given[0] == path:
        return given[1], None, given[2], False
    return _read_script(path)


def _abspath(path: str) -> str:
    """``_Py_abspath``: the directory joined on, not normalised (``/tmp/./x.py`` stays)."""
    if os.path.isabs(path):
        return path
    return os.path.join(os.getcwd(), path)


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def _cannot_open(program: str, filename: str, exc: OSError) -> None:
    sys.stderr.write(
        f"{program}: can't open file {filename!r}: [Errno {exc.errno}] {exc.strerror}\n"
    )
    raise SystemExit(2)

"""Handing a Python job to a pre-started interpreter: the checks only the agent can make,
the message the interpreter gets, and the agent's ends of the program's pipes.

Split from :mod:`ember.agent.pool`; :func:`ember.agent.pyargs.plan` decides from the command
line alone, :mod:`ember.agent.pyjob` applies the message in the interpreter.
"""

from __future__ import annotations

import codecs
import io
import os
from typing import IO, Any, cast

from ember.agent.common import ExecError
from ember.agent.pyargs import PyJob
from ember.agent.pyfind import PythonFinder


def acceptable(job: PyJob, env: dict[str, str], info: dict[str, Any], finder: PythonFinder) -> bool:
    """What plan() cannot see: the file system and the codec registry."""
    if job.io_encoding:
        encoding = job.io_encoding.partition(":")[0]
        if encoding:
            try:
                codecs.lookup(encoding)
            except LookupError:
                return False  # python3 fails to start: let it say so
    if job.mode == "file" and job.target.endswith(".pyc"):
        return False
    if job.flags and not info.get("flags"):
        return False  # this interpreter cannot change sys.flags (see pystart._Flags)
    pool_user_site = bool(info.get("user_site_in_path"))
    job_user_site = False
    if not job.no_user_site:
        version = str(info.get("version", ""))
        base = env.get("PYTHONUSERBASE") if "ignore_environment" not in job.flags else None
        if not base:
            home = env.get("HOME") or "/root"
            base = os.path.join(home, ".local")
        user_site = os.path.join(base, "lib", f"python{version}", "site-packages")
        job_user_site = finder.is_dir(user_site)
    return not pool_user_site and not job_user_site


def job_spec(
    job: PyJob,
    env: dict[str, str],
    cwd: str | None,
    executable: str,
    want_stdin: bool,
    generation: int,
    seed: str = "",
) -> dict[str, Any]:
    """What a member needs to become the program; ``seed``: hex bytes for its generators
    when ``generation`` says a resume came since it started (see ``ResumeState.job_seed``)."""
    return {
        "mode": job.mode,
        "target": job.target,
        "argv": list(job.argv),
        "orig_argv": list(job.orig_argv),
        "executable": executable,
        "unbuffered": job.unbuffered,
        "flags": dict(job.flags),
        "pythonpath": list(job.pythonpath),
        "io_encoding": job.io_encoding,
        "no_user_site": job.no_user_site,
        "safe_path": job.safe_path,
        "env": dict(env),
        "cwd": cwd,
        "stdin": want_stdin,
        "generation": generation,
        "seed": seed,
    }


def check_cwd(program: str, cwd: str) -> None:
    """Refuse a bad ``cwd`` exactly as ``subprocess.Popen`` would, before using an interpreter."""
    try:
        if not os.path.isdir(cwd):
            os.stat(cwd)  # raises the real error if it does not exist
            raise NotADirectoryError(20, os.strerror(20), cwd)
    except OSError as exc:
        raise ExecError(f"cannot start {program!r}: {exc}") from None


class _Pipe(io.RawIOBase):
    """The agent's end of a program's pipe: ``fileno`` and ``close`` are all the relay uses.

    ``os.fdopen`` would ``fstat`` each descriptor: a system call, a few ms in this guest.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.read(self._fd, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: Any) -> int:
        return os.write(self._fd, data)

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


def as_file(fd: int) -> IO[bytes]:
    return cast("IO[bytes]", _Pipe(fd))

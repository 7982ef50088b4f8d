"""Running ``ip`` and ``nft`` for the sandbox networks, optionally inside a namespace.

Split from :mod:`ember.network.host` so that the namespace pool
(:mod:`ember.network.pool`) and the host side share one way to run them:
started with :func:`_start` (so several can run at once, e.g. while a VMM
restores) and reaped with :func:`_finish`, which turns a failure into a
:class:`~ember.errors.SandboxError` carrying the tool's own complaint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from ember.errors import SandboxError
from ember.network.netns import set_net_namespace

COMMAND_TIMEOUT = 30.0
_NSENTER = shutil.which("nsenter")  # util-linux


def _run(
    argv: list[str],
    stdin: str,
    *,
    netns: str | None = None,
    sysctls: dict[str, str] | None = None,
) -> None:
    """Run ``ip``/``nft`` (inside ``netns`` if given); SandboxError with its complaint."""
    _finish(_start(argv, stdin, netns=netns, sysctls=sysctls))


@dataclass
class _Command:
    argv: list[str]
    where: str
    proc: subprocess.Popen[bytes]
    stdin: bytes


def _start(
    argv: list[str],
    stdin: str,
    *,
    netns: str | None = None,
    sysctls: dict[str, str] | None = None,
) -> _Command:
    """Start ``argv`` (inside ``netns`` if given, after setting ``net.*`` ``sysctls`` there).

    Without sysctls, a namespace is entered by ``nsenter``, so that Python can
    start the process with vfork: a ``preexec_fn`` forces a full fork of the
    calling process, ~2 ms more here on a sandbox's critical path.
    """
    run = argv
    if netns is not None and not sysctls and _NSENTER is not None:
        run, netns = [_NSENTER, f"--net={netns}", *argv], None
        where = f" in {run[1][6:]}"
    else:
        where = f" in {netns}" if netns else ""
    try:
        proc = subprocess.Popen(
            run,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_in_namespace(netns, sysctls or {}),
        )
    except FileNotFoundError:
        raise SandboxError(
            f"{argv[0]} is needed for sandbox networking: apt-get install iproute2 nftables"
        ) from None
    return _Command(argv, where, proc, stdin.encode())


def _finish(command: _Command) -> None:
    try:
        _, stderr = command.proc.communicate(command.stdin, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        command.proc.kill()
        command.proc.wait()
        raise SandboxError(f"{' '.join(command.argv[:2])} did not finish") from None
    if command.proc.returncode != 0:
        raise SandboxError(
            f"{' '.join(command.argv[:2])}{command.where} failed: {stderr.decode().strip()}"
        )


def _stop(commands: list[_Command]) -> None:
    """Kill the commands still running (a failed sibling's, or a closed network's) and reap
    them all."""
    for command in commands:
        if command.proc.poll() is None:
            with contextlib.suppress(OSError):
                command.proc.kill()
        command.proc.wait()


def _in_namespace(netns: str | None, sysctls: dict[str, str]) -> Callable[[], None] | None:
    """Between fork and exec: enter ``netns``, then set ``net.*`` sysctls there (raw calls)."""
    if netns is None and not sysctls:
        return None

    def enter() -> None:
        if netns is not None:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                set_net_namespace(fd)
            except OSError:
                os._exit(126)
            os.close(fd)
        for name, value in sysctls.items():  # /proc/sys/net is the opener's namespace
            try:
                fd = os.open(f"/proc/sys/net/{name}", os.O_WRONLY)
            except FileNotFoundError:  # e.g. a kernel without IPv6
                continue
            os.write(fd, value.encode())
            os.close(fd)

    return enter

"""Run one build command with its output in a log file and a live status line.

Build tools print thousands of lines nobody wants on their terminal, but the
few lines before a failure are exactly what the user needs.  So all output
goes to the log, the last lines are kept in memory for the error message, and
the terminal only gets a status line (refreshed even while the command is
silent, e.g. ``tar`` unpacking for a minute).
"""

from __future__ import annotations

import collections
import os
import select
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Final

from ember.errors import BuildError
from ember.images.progress import Progress

TAIL_LINES: Final = 20
_TICK: Final = 0.5  # seconds between status refreshes while the command is silent


def run_logged(
    argv: Sequence[str],
    *,
    what: str,
    cwd: Path,
    log: BinaryIO,
    log_path: Path,
    progress: Progress,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    on_line: Callable[[str], str | None] | None = None,
) -> None:
    """Run ``argv``; raise :class:`BuildError` naming ``what`` with the output's tail on failure.

    ``on_line`` sees every output line and may return a new status text.
    ``stdin`` is fed to the command (a patch, for instance); otherwise stdin is
    /dev/null so no tool can stop to ask a question.
    """
    log.write(f"\n$ {' '.join(argv)}    # in {cwd}\n".encode())
    log.flush()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    status = f"{what}: running"
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    except OSError as exc:
        raise BuildError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc
    assert proc.stdout is not None
    try:
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        fd = proc.stdout.fileno()
        pending = b""
        while True:
            ready, _, _ = select.select([fd], [], [], _TICK)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                log.write(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    tail.append(line)
                    if on_line is not None:
                        status = on_line(line) or status
            progress.status(status)
        if pending:
            tail.append(pending.decode(errors="replace"))
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C) or an error above: do not leave make running
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        log.flush()
        progress.clear_status()
    if returncode != 0:
        shown = "\n".join(f"    {line}" for line in tail)
        raise BuildError(
            f"{what} failed (exit status {returncode}); last lines of output:\n{shown}\n"
            f"full log: {log_path}"
        )

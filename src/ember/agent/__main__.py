"""``python3 -m ember.agent``: start the guest agent.

In the guest (no options) it listens on vsock port :data:`AGENT_PORT` of any
CID, starts the run_code worker in the background, then connects once to the
host (CID 2, :data:`READY_PORT`) and sends ``REQUEST {"op": "ready",
"version", "pid"}``: the host learns the agent is up without polling a guest
whose every syscall costs ~0.3 ms. The announcement is best effort: a host
that is not listening simply does not hear it and can ``ping`` instead.

Options (for tests and debugging on a normal Linux host):

    --listen-unix PATH   listen on a Unix socket instead of vsock
    --ready-unix PATH    announce readiness to a Unix socket instead of vsock
    --no-worker          do not start the run_code worker until first used
    --preload MOD,MOD    interpreters the agent starts import these first
                         (sets EMBER_PRELOAD: see ember.agent.preload)
    --pool N             pre-started python3 interpreters for exec (default 4; 0: none;
                         see ember.agent.pool)
    --heap-mib N         heap each warm interpreter touches before the snapshot
                         (default 64; see ember.agent.heap)

The last three are template options; each may also come from the environment
(``EMBER_PRELOAD``, ``EMBER_POOL``, ``EMBER_HEAP_MIB``), the command line winning.

Arguments are parsed by hand: ``argparse`` pulls in ``re`` and ``gettext``,
which would cost the guest seconds of start-up for three flags. Everything the
ops need is imported (and ``json`` loaded) *before* readiness is announced, so
a template snapshotted after the announcement holds a fully warm agent.
"""

from __future__ import annotations

import os
import socket
import sys

from ember.agent import preload as preload_mod
from ember.agent.heap import (
    DEFAULT_HEAP_MIB,
    per_interpreter,
    tune_min_free,
    tune_page_reporting,
    tune_thp,
)
from ember.agent.pool import DEFAULT_SIZE, IDLE_S, STARTED, InterpreterPool
from ember.agent.preload import ENV as PRELOAD_ENV
from ember.agent.runcode import CodeRunner
from ember.agent.server import AgentServer
from ember.protocol import (
    AGENT_PORT,
    HOST_CID,
    PROTOCOL_VERSION,
    READY_PORT,
    RUN_DIR,
    Kind,
    decode_json,
    write_json,
)

USAGE = (
    "usage: python3 -m ember.agent [--listen-unix PATH] [--ready-unix PATH] [--no-worker]"
    " [--preload MOD,MOD] [--pool N] [--heap-mib N]\n"
)
POOL_ENV = "EMBER_POOL"
HEAP_ENV = "EMBER_HEAP_MIB"
IDLE_ENV = "EMBER_POOL_IDLE_S"


def _parse(argv: list[str]) -> dict[str, str | bool] | None:
    options: dict[str, str | bool] = {}
    args = iter(argv)
    for arg in args:
        if arg in ("--listen-unix", "--ready-unix", "--preload", "--pool", "--heap-mib"):
            value = next(args, None)
            if value is None:
                return None
            options[arg[2:]] = value
        elif arg == "--no-worker":
            options["no-worker"] = True
        else:
            return None
    return options


def _listen(unix_path: str | None) -> socket.socket:
    if unix_path is not None:
        try:
            os.unlink(unix_path)  # a stale socket from a previous run
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(unix_path)
    else:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, AGENT_PORT))
    sock.listen(128)
    return sock


def _announce(unix_path: str | None) -> None:
    try:
        if unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[int, int] = unix_path
        else:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            address = (HOST_CID, READY_PORT)
        with sock:
            sock.settimeout(10.0)
            sock.connect(address)
            write_json(
                sock,
                Kind.REQUEST,
                {"op": "ready", "version": PROTOCOL_VERSION, "pid": os.getpid()},
            )
    except OSError:
        pass  # nobody listening: the host will find us with ping


def _make_run_dir() -> None:
    """:data:`RUN_DIR` in the template, so that no ``ember run`` makes it (see protocol)."""
    try:
        os.mkdir(RUN_DIR, 0o755)
    except OSError:
        pass  # there already, or /tmp is not writable: a run's file write says why


def _count(options: dict[str, str | bool], name: str, env: str, default: int) -> int | None:
    """A non-negative integer option: the command line, else the environment, else default."""
    given = options.get(name)
    text = given if isinstance(given, str) else os.environ.get(env, "")
    try:
        value = int(text) if text else default
    except ValueError:
        return None
    return value if value >= 0 else None


def main(argv: list[str] | None = None) -> int:
    options = _parse(sys.argv[1:] if argv is None else argv)
    pool_size = heap_mib = None
    if options is not None:
        pool_size = _count(options, "pool", POOL_ENV, DEFAULT_SIZE)
        heap_mib = _count(options, "heap-mib", HEAP_ENV, DEFAULT_HEAP_MIB)
    if options is None or pool_size is None or heap_mib is None:
        sys.stderr.write(USAGE)
        return 2
    listen_unix, ready_unix = options.get("listen-unix"), options.get("ready-unix")
    preload = options.get("preload")
    if isinstance(preload, str):
        os.environ[PRELOAD_ENV] = preload  # inherited by the run_code worker and the pool
    worker = not options.get("no-worker")
    tune_thp()  # huge pages for the heaps that ask, never a stall or a scan for them
    tune_min_free()  # and not the ~25 MiB reserve that turning them on asked for
    tune_page_reporting()  # freed memory goes back to the host with less of it free
    # Each warm interpreter's pre-faulted heap, within what the guest can spare (the pool's
    # started members have one; the ones the mother forks do not).
    heap = per_interpreter(heap_mib, min(pool_size, STARTED) + int(worker))
    listener = _listen(listen_unix if isinstance(listen_unix, str) else None)
    if not isinstance(listen_unix, str):  # in the guest: a test's agent leaves the host alone
        _make_run_dir()
    pool = None
    if pool_size:
        pool = InterpreterPool(
            pool_size,
            preload=tuple(preload_mod.modules()),
            heap_bytes=heap,
            idle_s=float(os.environ.get(IDLE_ENV) or IDLE_S),  # tests make refills prompt
        )
    server = AgentServer(listener, runner=CodeRunner(heap_bytes=heap if worker else 0), pool=pool)
    if worker:
        server.runner.start_in_background()
    if pool is not None:
        pool.start()
    decode_json(b"{}")  # load json now, so a snapshot taken after "ready" holds it
    _announce(ready_unix if isinstance(ready_unix, str) else None)
    try:
        server.serve_forever()
    finally:
        listener.close()
        if isinstance(listen_unix, str):
            try:
                os.unlink(listen_unix)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A node's ``ember serve``, tied to the life of its Ray node agent.

``python -m ember.ray.supervise --state-dir D --listen HOST:PORT`` runs the daemon as
its child and watches its own stdin, a pipe whose only writer is the node agent's
process.  EOF on it means the agent is gone, however it went: ``stop()``, ``ray.kill``,
or a SIGKILL with no chance to clean up (``remove_node``, the OOM killer, a lost
raylet).  ``PR_SET_PDEATHSIG`` cannot do this job: it fires when the *thread* that
forked the child exits, and Ray runs actor methods on threads of its choosing.

On EOF the supervisor stops the daemon first (SIGTERM, then SIGKILL after a grace),
so from then on clients get "connection refused" and raise ``SandboxLost`` at once,
never waiting on a node the cluster has given up.  Then it destroys that daemon's
sandboxes: the registry has forgotten them, so nobody could reach or delete them
later.  It does so with the daemon's own code, a :class:`~ember.serve.manager.Manager`
on the same state directory, which re-adopts the VMMs from the keeper and deletes
each; the keeper leaves by itself once it holds no VMM.

The supervisor runs in a session of its own, so signals for the Ray worker's process
group miss it.  If it is itself SIGKILLed, the daemon follows (``PR_SET_PDEATHSIG``)
but its sandboxes stay with the keeper until a daemon on that state directory deletes
them (``python -m ember.ray.supervise`` again, or ``ember serve --state-dir``).

This module imports no Ray (the package's names are lazy): it starts in a fraction
of a second on every node.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

GRACE_S = 5.0  # SIGTERM to SIGKILL: in-flight streams may hold uvicorn's shutdown
PR_SET_PDEATHSIG = 1


def daemon_argv(state_dir: Path, listen: str) -> list[str]:
    return [sys.executable, "-m", "ember.cli.main", "serve", "--listen", listen,
            "--state-dir", str(state_dir)]  # fmt: skip


def _die_with_parent() -> None:
    """In the daemon, before exec: SIGTERM when the supervisor dies (even by SIGKILL).
    Reliable here, unlike in a Ray worker: the supervisor forks from its only thread."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after :data:`GRACE_S`; the VMMs stay with the keeper."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def destroy_sandboxes(state_dir: Path) -> int:
    """Delete every sandbox recorded in ``state_dir`` (no daemon may run on it)."""
    if not any((state_dir / "sandboxes").glob("*.json")):
        return 0
    from ember.serve.manager import Manager, NotFound
    from ember.serve.state import StateDir

    manager = Manager(StateDir(state_dir), reap_interval=3600.0)
    manager.start()  # re-adopts them from the keeper
    deleted = 0
    try:
        for entry in manager.find():
            try:
                manager.delete(entry.record.id)
                deleted += 1
            except NotFound:
                continue
            except Exception as exc:
                print(f"ember.ray.supervise: cannot delete {entry.record.id}: {exc}",
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        manager.stop()
    return deleted


def watch(proc: subprocess.Popen[bytes]) -> bool:
    """Until stdin reaches EOF (True) or the daemon exits by itself (False)."""
    stdin = sys.stdin.buffer.fileno()
    while proc.poll() is None:
        ready, _, _ = select.select([stdin], [], [], 1.0)
        if ready and not os.read(stdin, 4096):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.ray.supervise")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # ray.kill: clean up too
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_SERVER", "EMBER_TOKEN")}
    proc = subprocess.Popen(daemon_argv(args.state_dir, args.listen), env=env,
                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # fmt: skip
    code = 0
    try:
        if not watch(proc):
            code = proc.returncode or 1
            print(f"ember.ray.supervise: the daemon exited ({proc.returncode})",
                  file=sys.stderr, flush=True)  # fmt: skip
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc)
        destroy_sandboxes(args.state_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""How long ``run_code`` takes to get over a cell that overran its timeout or killed its worker.

Usage: ``.venv/bin/python bench/recovery.py [--runs 3] [--json]``

Per run, in one fresh sandbox (the default template) and in this order:

- ``crash1``: ``os._exit(3)`` in a cell of the template's own worker: the seconds until
  ``WorkerCrashed`` (its holder keeps its memory, so the report does not wait for the guest
  kernel's teardown), and the next call's (a replacement: a pre-started interpreter of the
  exec pool, or a fresh ``python3`` importing the template's preload when none can take it);
- ``overrun``: ``run_code("while True: pass", timeout=1)`` returns ``WorkerTimeout``; the
  seconds it took, and the next call's (``state kept`` says whether a variable set before it
  survived: the cell is interrupted, not the worker killed);
- ``stubborn``: the same with a cell that ignores ``SIGINT``, so the worker is killed after
  the agent's grace, and the next call waits for a replacement;
- ``crash2``: the same in a replacement (a pooled one has a holder, so its death is reported
  before its memory is torn down).

Peer, in the same run on the host (the floor a local notebook kernel sets): a ``python3``
subprocess running the same overrunning loop, interrupted with ``SIGINT`` at 1 s (seconds
until its ``KeyboardInterrupt`` is reported), and a fresh ``python3 -c "import numpy"`` (what
a kernel restart costs natively: the template's worker preloads numpy). Medians, nothing
asserted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from _common import fmt_num, fmt_ratio, format_table, ratio, summarize, to_json
from run import guest_numpy_dir, host_python  # the same host peer as bench/run.py's

from ember import Sandbox

LOOP = "while True: pass"
STUBBORN = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
TIMEOUT_S = 1.0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def one_sandbox() -> dict[str, float]:
    out: dict[str, float] = {}
    with Sandbox() as sb:
        run = sb.run_code

        def crash(key: str) -> None:
            out[key], r = timed(lambda: run("import os\nos._exit(3)", timeout=600))
            assert r.error is not None and r.error.type == "WorkerCrashed", r
            out[f"{key}_next"], _ = timed(lambda: run("6 * 7", timeout=600))

        crash("crash1")  # the template's own worker
        assert run("kept = 1").error is None
        out["overrun"], r = timed(lambda: run(LOOP, timeout=TIMEOUT_S))
        assert r.error is not None and r.error.type == "WorkerTimeout", r
        out["overrun_next"], r = timed(lambda: run("'kept' in globals()", timeout=600))
        out["overrun_kept"] = float(r.value == "True")
        out["stubborn"], r = timed(lambda: run(STUBBORN, timeout=TIMEOUT_S))
        assert r.error is not None and r.error.type == "WorkerTimeout", r
        out["stubborn_next"], _ = timed(lambda: run("6 * 7", timeout=600))
        crash("crash2")  # a replacement's
        replaced, pooled = sb.ping().get("worker_replacements") or (0, 0)  # (older agents)
        out["pooled_share"] = pooled / replaced if replaced else 0.0
    return out


def host_interrupt() -> float:
    """A host python3 in the same loop, SIGINT at TIMEOUT_S: seconds until it has said so."""
    proc = subprocess.Popen([host_python(), "-c", LOOP], stderr=subprocess.DEVNULL)
    time.sleep(TIMEOUT_S)
    t = time.perf_counter()
    proc.send_signal(signal.SIGINT)  # KeyboardInterrupt: its traceback, then exit
    proc.wait(timeout=60)
    return TIMEOUT_S + time.perf_counter() - t


def host_restart() -> float | None:
    """A fresh host python3 importing the guest's own numpy build; None if it cannot."""
    env = dict(os.environ, PYTHONPATH=guest_numpy_dir() or "")
    command = [host_python(), "-c", "import numpy"]
    seconds, done = timed(lambda: subprocess.run(command, env=env, check=False))
    return seconds if done.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs: dict[str, list[float | None]] = {}
    for _ in range(args.runs):
        for key, value in one_sandbox().items():
            runs.setdefault(key, []).append(value)
        runs.setdefault("host_interrupt", []).append(host_interrupt())
        runs.setdefault("host_restart", []).append(host_restart())
    summary = {key: summarize(values) for key, values in runs.items()}
    if args.json:
        print(to_json({k: v.as_dict() if v else None for k, v in summary.items()}))
        return

    def p50(key: str) -> float | None:
        s = summary.get(key)
        return None if s is None else s.p50

    rows = [
        ("the template's worker dies -> WorkerCrashed, s", "crash1", None),
        ("... the next call (a new worker), s", "crash1_next", "host_restart"),
        ("overrun (timeout 1 s) -> WorkerTimeout, s", "overrun", "host_interrupt"),
        ("... the next call, s", "overrun_next", None),
        ("a SIGINT-proof cell -> WorkerTimeout, s", "stubborn", None),
        ("... the next call (a new worker), s", "stubborn_next", "host_restart"),
        ("a replacement worker dies -> WorkerCrashed, s", "crash2", None),
        ("... the next call (a new worker), s", "crash2_next", "host_restart"),
    ]
    table = [
        [label, fmt_num(p50(key), 3), fmt_num(p50(peer), 3) if peer else "-",
         fmt_ratio(ratio(p50(key), p50(peer))) if peer else "-"]
        for label, key, peer in rows
    ]  # fmt: skip
    print(format_table(["run_code recovery, p50", "ember", "host", "ember/host"], table))
    print(
        f"state kept across the overrun: {fmt_num(p50('overrun_kept'), 2)} of runs; "
        f"replacements from the pool: {fmt_num(p50('pooled_share'), 2)}"
    )


if __name__ == "__main__":
    main()

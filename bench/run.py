"""Running code in a sandbox, end to end: pre-started interpreters and pre-faulted heaps.

Usage: ``.venv/bin/python bench/run.py [--runs 5] [--json] [--skip-real]``

What issue 15 measures, each beside its peer from the same run:

- ``ember run hello.py`` (a new CLI process each run: through the run daemon, which has a warm
  spare, 1 s apart and back to back, when the daemon is still making the next spare; and with
  ``EMBER_RUNNER=0``, in-process: restore, upload, exec, tear down; each series run on its
  own, since an in-process run loads both cores while the daemon makes a spare) against
  ``python3 hello.py`` on the host and against ``ember exec -- python3 -O -c HELLO`` (a new
  guest python3: the path every run took before the pool); ``hello.py`` prints a line and
  exits 3;
- ``exec(["python3", "-c", ...])`` in a live sandbox (its first and second Python exec, both
  served by pre-started interpreters) against the same through a real guest process
  (``python3 -O -c``: ``-O`` is a flag a pre-started interpreter cannot honour, so it is the
  "before" path, a new ``python3``) and against the host; and a third one
  :data:`THIRD_GAP_S` after the second, the pace of an agent's tool calls, and a fourth and
  fifth at the same pace: the template's two started interpreters are used by then, the
  third and fourth go to the two it forked and warmed, the fifth to a refill (the pool held
  two interpreters before, so the third was a refill). A refill used to be a fresh
  ``python3`` plus its preload imports (~20 s of idle time with numpy here: ~5 s to start,
  ~14 s to import numpy from a warm page cache), so it got a real process; now the
  template's mother interpreter forks it (~4 s here), and an exec that finds the pool empty
  waits for that fork rather than start ``python3``; and two sent at once (an agent's
  parallel tool calls) on a sandbox whose pool is used up: the slower one's time (the second
  waits for the second fork);
- a 10 MiB and a 100 MiB ``bytearray`` in the warm ``run_code`` interpreter (time inside the
  guest), against the same in a new guest ``python3`` (no pre-faulted heap) and on the host:
  after the execs above (the pool's refills still under way) and as the first call of a fresh
  sandbox;
- ``import numpy`` and a 200x200 ``numpy.linalg.eig`` in a Python exec (time inside the guest),
  the default template preloading numpy, against the host's python3 running the guest's own
  numpy (the image cache's layer on ``PYTHONPATH``: the same build, default threads), and
  again with the guest's SSE-only settings where it has them (the ``pvm`` CPU template); then,
  in the same program, six standard library modules programs import most, then asyncio,
  sqlite3, urllib.request and uuid (templates preload them all:
  ``ember.images.packages.STDLIB_PRELOAD``);
- the same first calls on a sandbox taken from a spare (``keep_warm(1)``, restored and warmed
  ahead, waiting 1 s): ``Sandbox()`` ready, its first and second Python exec, its first
  10 MiB allocation;
- ``Sandbox()`` ready, and the private dirty memory of the sandbox's VMM after a ping and after
  the Python exec: memory the sandbox did not touch must not cost the host anything.

Medians over ``--runs``, ratios to the host; nothing is asserted. The real-process rows cost the
guest ~10-20 s each here (``--skip-real`` leaves them out).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import fmt_num, fmt_ratio, format_table, ratio, spare_after, summarize, to_json

from ember import Sandbox
from ember.agent.simd import SIMD_ENV  # what ember-init may set to keep SSE only

HELLO = "print('hello from the sandbox')\nraise SystemExit(3)\n"
ALLOC = (
    "import time\nt = time.perf_counter()\nb = bytearray({mib} << 20)\n"
    "seconds = time.perf_counter() - t\ndel b\n"
)
# Imports programs make most, a row each (the templates preload them all:
# ember.images.packages.STDLIB_PRELOAD), timed in the NUMPY program after its eig.
IMPORT_ROWS = {
    "stdlib_import": "import json, pathlib, subprocess, logging, argparse, dataclasses",
    "net_import": "import asyncio, sqlite3, urllib.request, uuid",
    "mp_import": "import multiprocessing.pool, concurrent.futures.process, zoneinfo",
}
NUMPY = (
    "import time\nt0 = time.perf_counter()\nimport numpy as np\nt1 = time.perf_counter()\n"
    "a = np.random.default_rng(0).random((200, 200))\nt2 = time.perf_counter()\n"
    "np.linalg.eig(a)\nt3 = time.perf_counter()\ntimes = [t1 - t0, t3 - t2]\n"
    + "".join(
        f"t = time.perf_counter()\n{line}\ntimes.append(time.perf_counter() - t)\n"
        for line in IMPORT_ROWS.values()
    )
    + "print(*times)\n"
)
NUMPY_KEYS = ("numpy_import", "numpy_eig", *IMPORT_ROWS)  # what NUMPY prints, in order
THIRD_GAP_S = 2.0  # between the second and the third Python exec in a live sandbox
TARGETS = {
    "ember run hello.py": "<= 0.300 s",
    "exec python3 -c (1st)": "<= 0.100 s",
    "exec python3 -c (3rd, 2 s on)": "<= 0.100 s",
    "bytearray 10 MiB": "<= 0.050 s",
    "import numpy": "<= 0.050 s",
    "numpy eig 200x200": "<= 2x host",
    "Sandbox() ready": "<= 0.050 s",
}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def uss_mib(pid: int) -> float | None:
    """Private dirty memory of a process, from smaps_rollup: what this sandbox alone costs.

    Not all of USS: the template pages a lone sandbox's guest has read are Private_Clean only
    while no sibling maps the template (~18 MiB after a ping here); with a second sandbox alive
    they are Shared_Clean, the template's page cache, paid once per host.
    """
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    lines = text.splitlines()
    kib = sum(int(line.split()[1]) for line in lines if line.startswith("Private_Dirty"))
    return kib / 1024


def host_python() -> str:
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def guest_numpy_dir() -> str | None:
    """The guest's own numpy (a layer of the image cache), for the host peer: same build."""
    from ember.images.cache import cache_root

    pattern = "rootfs-layer/*/upper/usr/local/lib/python3.11/dist-packages/numpy"
    found = sorted(cache_root().glob(pattern))
    return str(found[-1].parent) if found else None


def host_seconds(
    code: str, pythonpath: str | None = None, extra_env: dict[str, str] | None = None
) -> list[float] | None:
    """Run ``code`` (which prints seconds) in a new host python3; None if it fails."""
    env = dict(os.environ) | (extra_env or {})
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    r = subprocess.run(
        [host_python(), "-c", code], capture_output=True, text=True, check=False, env=env
    )
    if r.returncode != 0:
        return None
    return [float(x) for x in r.stdout.split()]


def bench_cli(runs: int, work: Path, real: bool) -> dict[str, list[float]]:
    """``ember run`` as a user types it (through the run daemon, which the first run starts:
    untimed, as are the daemon's first spares), and with ``EMBER_RUNNER=0`` (in-process)."""
    from ember.cli import runclient, runner

    hello = work / "hello.py"
    hello.write_text(HELLO)
    ember = Path(sys.executable).with_name("ember")
    out: dict[str, list[float]] = {
        "cli": [], "cli_b2b": [], "cli_local": [], "cli_real": [], "host": []
    }  # fmt: skip
    daemon_dir = work / "run"
    env = dict(os.environ, EMBER_RUNNER="1", EMBER_RUNNER_DIR=str(daemon_dir))
    local = dict(env, EMBER_RUNNER="0")

    def run(environment: dict[str, str]) -> float:
        t0 = time.monotonic()
        r = subprocess.run(
            [str(ember), "run", str(hello)], capture_output=True, check=False, env=environment
        )
        took = time.monotonic() - t0
        if r.returncode != 3 or b"hello from the sandbox" not in r.stdout:
            raise SystemExit(f"ember run hello.py failed ({r.returncode}): {r.stderr.decode()}")
        return took

    try:
        run(env)  # starts the daemon
        deadline = time.monotonic() + 120
        while not os.path.exists(runclient.socket_path(daemon_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)  # its first spares
        # Each series on its own: an in-process run between two daemon runs loads both cores
        # while the daemon makes its next spare, which is not what a user's commands see.
        for _ in range(runs):
            out["cli"].append(run(env))
            time.sleep(1.0)  # a spare is made again between runs, as between a user's commands
        time.sleep(3.0)
        for _ in range(runs):
            out["cli_b2b"].append(run(env))  # no pause: the next spare is still being made
        for i in range(runs):
            out["cli_local"].append(run(local))
            if real and i < 3:  # the same through a new guest python3 (-O: the pool declines it)
                t0 = time.monotonic()
                argv = [str(ember), "exec", "--", "python3", "-O", "-c", HELLO]
                subprocess.run(argv, capture_output=True, check=False, env=local)
                out["cli_real"].append(time.monotonic() - t0)
            out["host"].append(
                timed(lambda: subprocess.run([host_python(), str(hello)], capture_output=True))
            )
    finally:
        runner.stop(daemon_dir)
    return out


def bench_sandbox(runs: int, real: bool) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "ready", "exec1", "exec2", "exec3", "exec4", "exec5", "burst", "exec_real",
            "alloc10", "alloc100", "alloc10_real", "alloc10_fresh", *NUMPY_KEYS, "uss_ping",
            "uss_exec",
            "exec_host",
        )
    }  # fmt: skip
    code = "print(1)"
    for _ in range(runs):
        t0 = time.monotonic()
        sb = Sandbox()
        out["ready"].append(time.monotonic() - t0)
        with sb:
            sb.ping()  # the first request after a restore pays for the restore (resume)
            pid = sb._vmm.proc.pid if sb._vmm.proc is not None else 0
            if (u := uss_mib(pid)) is not None:
                out["uss_ping"].append(u)
            for key in ("exec1", "exec2"):
                t = time.monotonic()
                r = sb.exec(["python3", "-c", code], timeout=600)
                out[key].append(time.monotonic() - t)
                assert r.stdout == b"1\n", r
            if (u := uss_mib(pid)) is not None:
                out["uss_exec"].append(u)
            for key in ("exec3", "exec4", "exec5"):
                time.sleep(THIRD_GAP_S)
                t = time.monotonic()
                r = sb.exec(["python3", "-c", code], timeout=600)
                out[key].append(time.monotonic() - t)
                assert r.stdout == b"1\n", r
            for mib in (10, 100):
                r_code = sb.run_code(ALLOC.format(mib=mib) + "seconds", timeout=900)
                if r_code.error is None and r_code.value is not None:
                    out[f"alloc{mib}"].append(float(r_code.value))
        with Sandbox() as sb:  # a fresh one: its pool is full again, no refill under way
            r_code = sb.run_code(ALLOC.format(mib=10) + "seconds", timeout=900)
            if r_code.error is None and r_code.value is not None:
                out["alloc10_fresh"].append(float(r_code.value))
            r = sb.exec(["python3", "-c", NUMPY], timeout=900)
            if r.exit_code == 0:
                for key, seconds in zip(NUMPY_KEYS, r.stdout.split(), strict=True):
                    out[key].append(float(seconds))
            if real:
                t = time.monotonic()
                r = sb.exec(["python3", "-O", "-c", code], timeout=900)
                out["exec_real"].append(time.monotonic() - t)
                r = sb.exec(
                    ["python3", "-O", "-c", ALLOC.format(mib=10) + "print(seconds)"], timeout=900
                )
                if r.exit_code == 0:
                    out["alloc10_real"].append(float(r.stdout))
        with Sandbox() as sb:
            out["burst"].append(burst(sb, code))
        out["exec_host"].append(
            timed(lambda: subprocess.run([host_python(), "-c", code], capture_output=True))
        )
    return out


def burst(sb: Sandbox, code: str) -> float:
    """Seconds until the slower of two Python execs sent at once ends, the pool used up
    first (as by an agent's parallel tool calls): both wait for the mother's forks."""
    for _ in range(int(sb.ping()["pool"]["size"])):
        sb.exec(["python3", "-c", "pass"], timeout=600)
    results: list[bytes] = []

    def one() -> None:
        results.append(sb.exec(["python3", "-c", code], timeout=600).stdout)

    threads = [threading.Thread(target=one) for _ in range(2)]
    t = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - t
    assert results == [b"1\n", b"1\n"], results
    return took


def guest_simd_env() -> dict[str, str]:
    """The guest's SIMD settings, read from a sandbox: the host peer can run with them too."""
    with Sandbox() as sb:
        lines = sb.exec(["env"]).stdout.decode().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    return {name: env[name] for name in SIMD_ENV if name in env}


def host_allocs(runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        key: [] for key in ("alloc10", "alloc100", "eig_guest_simd", *NUMPY_KEYS)
    }
    numpy_dir = guest_numpy_dir()
    simd = guest_simd_env()
    for _ in range(runs):
        if simd:
            got = host_seconds(NUMPY, numpy_dir, simd)
            if got:
                out["eig_guest_simd"].append(got[1])
        for mib in (10, 100):
            got = host_seconds(ALLOC.format(mib=mib) + "print(seconds)")
            if got:
                out[f"alloc{mib}"].append(got[0])
        got = host_seconds(NUMPY, numpy_dir)
        if got:
            for key, seconds in zip(NUMPY_KEYS, got, strict=True):
                out[key].append(seconds)
    return out


def bench_spares(runs: int, gap_s: float = 1.0) -> dict[str, list[float]]:
    """The same first calls on sandboxes taken from a spare (``keep_warm(1)``), each having
    waited ``gap_s``: its first exec and a first 10 MiB allocation in its run_code worker."""
    from ember import keep_warm
    from ember.sandbox.spares import spare_key, spare_pool
    from ember.spec import SandboxSpec

    key = spare_key(SandboxSpec(), None, False)
    out: dict[str, list[float]] = {"ready": [], "exec1": [], "exec2": [], "alloc10": []}
    keep_warm(1)
    try:
        for _ in range(runs):
            for what in ("exec", "alloc"):
                spare_after(spare_pool(), key, gap_s)
                t0 = time.monotonic()
                with Sandbox() as sb:
                    out["ready"].append(time.monotonic() - t0)
                    if what == "exec":
                        for name in ("exec1", "exec2"):
                            t = time.monotonic()
                            assert sb.exec(["python3", "-c", "print(1)"]).stdout == b"1\n"
                            out[name].append(time.monotonic() - t)
                    else:
                        r_code = sb.run_code(ALLOC.format(mib=10) + "seconds", timeout=900)
                        if r_code.error is None and r_code.value is not None:
                            out["alloc10"].append(float(r_code.value))
    finally:
        keep_warm(0)
    return out


def p50(values: list[float]) -> float | None:
    s = summarize(values)
    return None if s is None else s.p50


def report(
    cli: dict[str, list[float]],
    sb: dict[str, list[float]],
    host: dict[str, list[float]],
    spare: dict[str, list[float]],
) -> dict[str, Any]:
    rows: dict[str, dict[str, float | None]] = {}

    def row(name: str, ember: list[float], before: list[float] | None, peer: list[float]) -> None:
        key = {"exec python3 -c (1st)": "exec1", "exec python3 -c (2nd)": "exec2",
               "bytearray 10 MiB": "alloc10", "Sandbox() ready": "ready"}.get(name)  # fmt: skip
        rows[name] = {
            "ember": p50(ember),
            "spare": p50(spare.get(key, [])) if key else None,
            "before": p50(before) if before is not None else None,
            "host": p50(peer),
        }

    row("ember run hello.py", cli["cli"], cli["cli_real"], cli["host"])
    row("ember run hello.py, back to back", cli["cli_b2b"], cli["cli_real"], cli["host"])
    row("ember run, in-process", cli["cli_local"], cli["cli_real"], cli["host"])
    row("exec python3 -c (1st)", sb["exec1"], sb["exec_real"], sb["exec_host"])
    row("exec python3 -c (2nd)", sb["exec2"], sb["exec_real"], sb["exec_host"])
    row("exec python3 -c (3rd, 2 s on)", sb["exec3"], sb["exec_real"], sb["exec_host"])
    row("exec python3 -c (4th, 2 s on)", sb["exec4"], sb["exec_real"], sb["exec_host"])
    row("exec python3 -c (5th, 2 s on)", sb["exec5"], sb["exec_real"], sb["exec_host"])
    row("2 execs at once, pool used up (slower)", sb["burst"], sb["exec_real"], sb["exec_host"])
    row("bytearray 10 MiB", sb["alloc10"], sb["alloc10_real"], host["alloc10"])
    row("bytearray 10 MiB, a fresh sandbox (1st call)", sb["alloc10_fresh"], None, host["alloc10"])
    row("bytearray 100 MiB", sb["alloc100"], None, host["alloc100"])
    row("import numpy", sb["numpy_import"], None, host["numpy_import"])
    row("numpy eig 200x200", sb["numpy_eig"], None, host["numpy_eig"])
    if host["eig_guest_simd"]:  # the guest keeps to SSE (README: user space keeps to SSE)
        row("numpy eig 200x200, host with the guest's SSE-only settings", sb["numpy_eig"], None,
            host["eig_guest_simd"])  # fmt: skip
    for key, line in IMPORT_ROWS.items():
        row(line, sb[key], None, host[key])
    row("Sandbox() ready", sb["ready"], None, [])
    memory = {"uss_after_ping_mib": p50(sb["uss_ping"]), "uss_after_exec_mib": p50(sb["uss_exec"])}
    return {"rows": rows, "memory": memory, "runs": len(sb["ready"])}


def print_report(result: dict[str, Any]) -> None:
    table = []
    for name, r in result["rows"].items():
        table.append([
            name, fmt_num(r["ember"], 3), fmt_num(r["spare"], 3), fmt_num(r["before"], 3),
            fmt_num(r["host"], 3), fmt_ratio(ratio(r["ember"], r["host"])), TARGETS.get(name, ""),
        ])  # fmt: skip
    headers = ["seconds (p50)", "ember", "from a spare", "real guest process", "host",
               "ember/host", "target"]  # fmt: skip
    print(format_table(headers, table))
    mem = result["memory"]
    print(
        "\nVMM private dirty memory (the template's page cache excluded), "
        f"p50 of {result['runs']} sandboxes: "
        f"{fmt_num(mem['uss_after_ping_mib'], 1)} MiB after a ping, "
        f"{fmt_num(mem['uss_after_exec_mib'], 1)} MiB after two Python execs"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-real", action="store_true", help="no real-process rows (slow)")
    parser.add_argument("--no-spares", action="store_true", help="no 'from a spare' column")
    args = parser.parse_args()
    with Sandbox():
        pass  # builds the default template if needed: not part of any figure
    with tempfile.TemporaryDirectory() as tmp:
        cli = bench_cli(args.runs, Path(tmp), real=not args.skip_real)
    sb = bench_sandbox(args.runs, real=not args.skip_real)
    host = host_allocs(args.runs)
    spare = {} if args.no_spares else bench_spares(args.runs)
    result = report(cli, sb, host, spare)
    if args.json:
        print(to_json(result))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

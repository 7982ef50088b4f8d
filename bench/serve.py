"""``ember serve``: what going through the daemon costs, beside the in-process SDK (issue 18).

Usage: ``.venv/bin/python bench/serve.py [--runs 10] [--clients 50] [--json]``

Starts its own daemon (a temporary state dir, a free port on 127.0.0.1) and measures, each
beside its peer from the same run:

- create -> ``exec(["true"])`` -> delete of a sandbox: ``Sandbox(server=URL)`` against the
  in-process ``Sandbox()`` (both restore the default template); and create ->
  ``run_code("6*7")`` -> delete (an agent's sandbox for one cell: no guest process started,
  so the restore's own cost shows);
- a ``run_code("1")`` round trip in a live sandbox, through the daemon and in-process;
- API latency under ``--clients`` concurrent clients (threads, one HTTP connection each):
  ``GET /sandboxes/ID`` (the daemon alone) and ``run_code`` (daemon + agent), p50 and p99;
- ``pause`` (snapshot to disk, VMM gone) and ``resume`` of a sandbox with state in it;
- ``GET /sandboxes`` with ``--list`` sandboxes alive (created through the API, 4 at a time).

Medians over ``--runs``; ratios daemon / in-process (the issue's goal is <= 1.2x). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from _common import fmt_num, fmt_ratio, format_table, ratio, summarize, to_json

from ember import Sandbox
from ember.sandbox.remote import RemoteSandbox


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_daemon(state: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    argv = [sys.executable, "-m", "ember.cli.main", "serve", "--listen", f"127.0.0.1:{port}",
            "--state-dir", str(state)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "EMBER_SERVER"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            token = (state / "token").read_text().strip()
            if httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {token}"}).is_success:
                return proc, url, token
        except (OSError, httpx.TransportError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the daemon did not start")


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def lifecycle(server: str) -> None:
    with Sandbox(server=server) as sb:
        sb.exec(["true"])


def one_cell(server: str) -> None:
    with Sandbox(server=server) as sb:
        assert sb.run_code("6*7").value == "42"


def concurrent(clients: int, per_client: int, request: Callable[[httpx.Client], Any],
               url: str, token: str) -> list[float]:  # fmt: skip
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                          timeout=600) as c:  # fmt: skip
            mine = [timed(lambda: request(c)) for _ in range(per_client)]
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--pauses", type=int, default=3, help="pause/resume rounds")
    parser.add_argument("--list", type=int, default=1000, help="sandboxes alive when listed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ember-bench-serve-") as tmp:
        proc, url, token = start_daemon(Path(tmp) / "state")
        os.environ["EMBER_TOKEN"] = token
        try:
            report = measure(args, url, token)
        finally:
            proc.terminate()
            proc.wait(60)
    if args.json:
        print(to_json(report))
        return
    rows = []
    for name in ("create_exec_delete_s", "create_run_code_delete_s", "run_code_s"):
        d, i = report[name]["daemon"]["p50"], report[name]["in_process"]["p50"]
        rows.append([name, fmt_num(d, 4), fmt_num(i, 4), fmt_ratio(ratio(d, i))])
    print(format_table(["median", "daemon", "in-process", "ratio"], rows))
    print()
    rows = [[name, fmt_num(v["p50"], 4), fmt_num(v["p99"], 4), str(v["n"])]
            for name, v in report["concurrent"].items()]  # fmt: skip
    print(format_table([f"{args.clients} clients", "p50 s", "p99 s", "requests"], rows))
    print()
    rows = [[name, fmt_num(v["p50"], 3), str(v["n"])] for name, v in report["state"].items()]
    print(format_table(["lifecycle", "p50 s", "n"], rows))


ONE = {"code": "1"}


def pair(daemon: list[float], local: list[float]) -> dict[str, Any]:
    d, i = summarize(daemon), summarize(local)
    return {"daemon": d.as_dict() if d else {"p50": None},
            "in_process": i.as_dict() if i else {"p50": None}}  # fmt: skip


def measure(args: argparse.Namespace, url: str, token: str) -> dict[str, Any]:
    lifecycle("")  # warm both paths (the zygote here, the keeper there)
    lifecycle(url)
    report: dict[str, Any] = {}
    daemon, local = [], []
    for _ in range(args.runs):
        daemon.append(timed(lambda: lifecycle(url)))
        local.append(timed(lambda: lifecycle("")))
    report["create_exec_delete_s"] = pair(daemon, local)
    daemon, local = [], []
    for _ in range(args.runs):
        daemon.append(timed(lambda: one_cell(url)))
        local.append(timed(lambda: one_cell("")))
    report["create_run_code_delete_s"] = pair(daemon, local)
    with Sandbox(server=url) as remote, Sandbox(server="") as here:
        remote.run_code("1")
        here.run_code("1")
        rd = [timed(lambda: remote.run_code("1")) for _ in range(args.runs)]
        rl = [timed(lambda: here.run_code("1")) for _ in range(args.runs)]
        report["run_code_s"] = pair(rd, rl)
        path = f"/sandboxes/{remote.id}"
        report["concurrent"] = {}
        for name, request in (
            ("GET /sandboxes/ID", lambda c: c.get(path).raise_for_status()),
            ("POST run_code", lambda c: c.post(f"{path}/run_code", json=ONE).raise_for_status()),
        ):  # fmt: skip
            lat = concurrent(args.clients, args.per_client, request, url, token)
            report["concurrent"][name] = {"p50": pct(lat, 50), "p99": pct(lat, 99), "n": len(lat)}
    report["state"] = pause_resume(url, args.pauses)
    if args.list:
        report["state"].update(listing(url, token, args.list))
    return report


def pause_resume(url: str, rounds: int) -> dict[str, Any]:
    """Pause and resume one sandbox ``rounds`` times; its interpreter's state must survive."""
    pauses, resumes = [], []
    with Sandbox(server=url) as sb:
        assert isinstance(sb, RemoteSandbox)
        sb.run_code("x = 41")
        for _ in range(rounds):
            pauses.append(timed(sb.pause))
            resumes.append(timed(sb.resume))
            if sb.run_code("x + 1").value != "42":
                raise SystemExit("a resumed sandbox lost its state")
    return {"pause": {"p50": statistics.median(pauses), "n": rounds},
            "resume": {"p50": statistics.median(resumes), "n": rounds}}  # fmt: skip


def listing(url: str, token: str, count: int) -> dict[str, Any]:
    """``GET /sandboxes`` with ``count`` alive (the API's create, 4 at a time, then delete)."""
    ids: list[str] = []
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {token}"}

    def create(n: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=600) as c:
            for _ in range(n):
                sid = c.post("/sandboxes", json={}).raise_for_status().json()["id"]
                with lock:
                    ids.append(sid)

    started = time.perf_counter()
    workers = [threading.Thread(target=create, args=(count // 4 + (i < count % 4),))
               for i in range(4)]  # fmt: skip
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    created = time.perf_counter() - started
    with httpx.Client(base_url=url, headers=headers, timeout=600) as c:
        lists = []
        for _ in range(5):
            t = time.perf_counter()
            listed = len(c.get("/sandboxes").raise_for_status().json()["sandboxes"])
            lists.append(time.perf_counter() - t)
        for sid in ids:
            c.delete(f"/sandboxes/{sid}")
    return {
        f"GET /sandboxes ({listed} alive)": {"p50": statistics.median(lists), "n": 5},
        f"create {count} (4 clients), s each": {"p50": created / count, "n": count},
    }


if __name__ == "__main__":
    main()

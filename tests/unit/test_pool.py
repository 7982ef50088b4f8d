"""Pre-started interpreters (ember.agent.pool, and the py* files they run) on a Unix socket.

The agent runs as a real subprocess with a real pool of this host's ``/usr/bin/python3``
(Debian 12's 3.11, the guest's python3), exactly as in the guest but for the socket family.
The table test runs each program once through a pre-started interpreter and once through a
real ``python3`` (``"pool": false``) and requires the same stdout, stderr and status.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ember import protocol
from ember.agent import hugemap, pybase
from ember.agent.pool import FORK_WAIT_S, STARTED
from ember.client import AgentClient
from ember.errors import AgentError
from ember.protocol import Kind, read_frame, write_frame, write_json
from tests.waiting import wait_for

SRC = Path(__file__).resolve().parents[2] / "src"
PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(
    not os.path.exists(PYTHON), reason=f"needs {PYTHON} (the guest's interpreter)"
)


@dataclass
class Run:
    stdout: bytes
    stderr: bytes
    result: dict[str, Any]

    def outcome(self) -> tuple[bytes, bytes, Any, Any]:
        return self.stdout, self.stderr, self.result["exit_code"], self.result["signal"]


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    path: str
    client: AgentClient
    home: Path

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(self.path)
        return sock

    def pool(self) -> dict[str, Any]:
        status = self.client.ping()["pool"]
        assert isinstance(status, dict)
        return status

    def first_fill_done(self, timeout: float = 60.0) -> dict[str, Any]:
        """The pool's status once its first fill has ended (ready or failed)."""
        deadline = time.monotonic() + timeout
        while (status := self.pool())["state"] == "starting":
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        return status

    def wait_full(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.pool()
            if status["ready"] == status["size"] and not status["holders"]:
                return status
            assert time.monotonic() < deadline, status
            time.sleep(0.02)

    def run(
        self,
        argv: list[str],
        *,
        pool: bool = True,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        files: dict[str, bytes] | None = None,
    ) -> Run:
        request: dict[str, Any] = {"op": "exec", "argv": argv, "stdin": stdin is not None}
        request["pool"] = pool
        if files is not None:
            request["files"] = [
                {"path": path, "data": base64.b64encode(data).decode()}
                for path, data in files.items()
            ]
        for key, value in (("env", env), ("cwd", cwd), ("timeout", timeout)):
            if value is not None:
                request[key] = value
        out, err = bytearray(), bytearray()
        with self.connect() as sock:
            write_json(sock, Kind.REQUEST, request)
            if stdin is not None:
                try:
                    if stdin:
                        write_frame(sock, Kind.STDIN, stdin)
                    write_frame(sock, Kind.STDIN_EOF, b"")
                except OSError:  # as the SDK (exec_blocking): a program that exits without
                    pass  # reading may be answered and closed before its stdin's EOF arrives
            while (frame := read_frame(sock)) is not None:
                kind, payload = frame
                if kind is Kind.STDOUT:
                    out += payload
                elif kind is Kind.STDERR:
                    err += payload
                elif kind is Kind.RESULT:
                    return Run(bytes(out), bytes(err), protocol.decode_json(payload))
                else:
                    raise AssertionError(f"{kind.name}: {payload!r}")
        raise AssertionError("no result")

    def pooled(self, argv: list[str], **kwargs: Any) -> Run:
        """Run through a pre-started interpreter (and check that it was one)."""
        served = self.wait_full()["served"]
        run = self.run(argv, **kwargs)
        assert self.pool()["served"] == served + 1, "not served by the pool"
        return run


def start_agent(base: Path, *extra: str, env: dict[str, str] | None = None) -> Agent:
    path, ready_path = str(base / "agent.sock"), str(base / "ready.sock")
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ready.bind(ready_path)
    ready.listen(1)
    ready.settimeout(30)
    agent_env = {**os.environ, "EMBER_POOL_IDLE_S": "0.05", **(env or {})}
    agent_env["PYTHONPATH"] = str(SRC)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.agent", "--listen-unix", path, "--ready-unix", ready_path,
         "--heap-mib", "8", *extra],
        env=agent_env,
    )  # fmt: skip
    try:
        ready.accept()[0].close()
    finally:
        ready.close()
    holder: list[Agent] = []
    agent = Agent(proc, path, AgentClient(lambda: holder[0].connect()), base)
    holder.append(agent)
    return agent


def stop_agent(agent: Agent) -> None:
    agent.client.shutdown()
    assert agent.proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = start_agent(tmp_path_factory.mktemp("pool"))
    try:
        deadline = time.monotonic() + 60
        while a.pool()["state"] != "ready":
            assert time.monotonic() < deadline, a.pool()
            time.sleep(0.05)
        yield a
        stop_agent(a)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


# -- the table: a pre-started interpreter against a real python3 -------------------------


@dataclass
class Case:
    name: str
    argv: list[str]
    files: dict[str, str] = field(default_factory=dict)
    stdin: bytes | None = None
    env: dict[str, str] | None = None


SHOW = """\
import os, sys
print(sys.argv, sys.orig_argv, sys.executable, sys.path[0], sys.path[1:3])
print(__name__, globals().get("__file__"), type(__loader__).__name__, __package__,
      __spec__ and (__spec__.name, __spec__.origin))
print(list(globals()))
print(sys.flags, sys.dont_write_bytecode)
for s in (sys.stdin, sys.stdout, sys.stderr):
    print(s.name, s.encoding, s.errors, s.line_buffering, s.write_through, s.mode,
          type(s.buffer).__name__, s.fileno(), s is getattr(sys, "__" + s.name[1:-1] + "__"),
          s.seekable(), s.isatty())
print(sorted(sys.modules))
print(sorted(os.environ.items()))
print(os.getcwd(), os.getpgrp() == os.getpid(), os.getsid(0) == os.getpid())
print(sorted(int(fd) for fd in os.listdir("/proc/self/fd")))
import site; print(site.ENABLE_USER_SITE, site.USER_SITE)
"""

TRACEBACK = """\
def inner(x):
    return 1 / x

def outer():
    return inner(0)

print("before", flush=True)
outer()
"""

FINALISERS = """\
import atexit, sys
import mod

class Noisy:
    def __init__(self, name):
        self.name = name

    def __del__(self):
        print("del", self.name, sys is not None, flush=True)

a = Noisy("main")
_b = Noisy("underscore")
cycle = Noisy("cycle")
cycle.me = cycle
del cycle
out = open("out.txt", "w")
out.write("written, never closed")
atexit.register(print, "atexit", flush=True)
print("main done")
"""

MOD = """\
log = open("mod.txt", "w")
log.write("a module's file, never closed")
"""

CASES = [
    Case("file", ["python3", "{d}/show.py", "a", "b c"], {"show.py": SHOW}),
    Case("relative file", ["python3", "./show.py"], {"show.py": SHOW}),
    Case("command", ["python3", "-c", SHOW, "x"]),
    Case("module", ["python3", "-m", "show", "y"], {"show.py": SHOW}),
    Case("package main", ["python3", "-m", "pkg"],
         {"pkg/__init__.py": "", "pkg/__main__.py": SHOW}),
    Case("directory", ["python3", "{d}/app"], {"app/__main__.py": SHOW}),
    Case("stdin", ["python3", "-", "z"], stdin=SHOW.encode()),
    Case("stdin without args", ["python3"], stdin=b"import sys; print(sys.argv, sys.path[0])"),
    Case("unbuffered", ["python3", "-u", "-c", SHOW]),
    Case("isolated", ["python3", "-I", "-c", SHOW], env={"PYTHONPATH": "/nowhere"}),
    Case("flags", ["python3", "-B", "-s", "-E", "-q", "-c", SHOW]),
    Case("safe path", ["python3", "-P", "{d}/show.py"], {"show.py": SHOW}),
    Case("pythonpath", ["python3", "-c", SHOW], env={"PYTHONPATH": "rel:/abs/../x::."}),
    Case("env flags", ["python3", "-c", SHOW],
         env={"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"}),
    Case("io encoding", ["python3", "-c", SHOW + "print('\\xe9')"],
         env={"PYTHONIOENCODING": "latin-1"}),
    Case("io errors", ["python3", "-c", SHOW], env={"PYTHONIOENCODING": ":replace", "TZ": "UTC"}),
    Case("exit code", ["python3", "-c", "import sys; print('out'); sys.exit(3)"]),
    Case("exit message", ["python3", "-c", "raise SystemExit('bye')"]),
    Case("exit none", ["python3", "-c", "import sys; sys.exit()"]),
    Case("traceback", ["python3", "{d}/tb.py"], {"tb.py": TRACEBACK}),
    Case("traceback in -c", ["python3", "-c", "def f():\n    raise KeyError('k')\nf()"]),
    Case("traceback in -m", ["python3", "-m", "tb"], {"tb.py": TRACEBACK}),
    Case("syntax error", ["python3", "{d}/bad.py"], {"bad.py": "x = (\n"}),
    Case("syntax error -c", ["python3", "-c", "1 +"]),
    Case("no such file", ["python3", "{d}/missing.py"]),
    Case("no such module", ["python3", "-m", "no_such_module_here"]),
    Case("keyboard interrupt", ["python3", "-c", "print(1, flush=True); raise KeyboardInterrupt"]),
    Case("signal", ["python3", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]),
    Case("os._exit", ["python3", "-c", "import os, sys; sys.stdout.write('lost'); os._exit(7)"]),
    Case("excepthook", ["python3", "-c",
                        "import sys\nsys.excepthook = lambda t, v, tb: print('hook', t.__name__)\n"
                        "raise ValueError"]),
    Case("broken excepthook", ["python3", "-c",
                               "import sys\ndef h(*a): raise OSError('h')\nsys.excepthook = h\n"
                               "raise ValueError('v')"]),
    Case("threads and atexit", ["python3", "-c",
                                "import atexit, threading, time\n"
                                "atexit.register(print, 'atexit')\n"
                                "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))"
                                ").start()\nprint('main')"]),
    Case("fork", ["python3", "-c",
                  "import os\npid = os.fork()\nif pid == 0:\n    print('child')\n    os._exit(4)\n"
                  "_, status = os.waitpid(pid, 0)\n"
                  "print('parent', os.waitstatus_to_exitcode(status))"]),
    Case("subprocess", ["python3", "-c",
                        "import subprocess, sys\n"
                        "r = subprocess.run([sys.executable, '-c', 'import sys; print(sys.argv)'],"
                        " capture_output=True)\nprint(r.stdout, r.returncode)"]),
    Case("wait for any child", ["python3", "-c", "import os\ntry:\n    os.wait()\n"
                                "except ChildProcessError as e:\n"
                                "    print('no children', e.errno)"]),
    Case("stdin data", ["python3", "-c", "import sys; print(sys.stdin.read().upper())"],
         stdin=b"hello\n"),
    Case("stdin streams", ["python3", "-c", SHOW], stdin=b""),
    Case("stdin closed", ["python3", "-c", "import sys; print(repr(sys.stdin.read()))"]),
    Case("coding cookie", ["python3", "{d}/latin.py"],
         {"latin.py": "# -*- coding: latin-1 -*-\nprint('caf\u00e9')\n"}),
    Case("annotations", ["python3", "-c", "x: int = 1\nprint(__annotations__)"]),
    Case("pickle main", ["python3", "-c",
                         "import pickle\nclass C: pass\n"
                         "print(pickle.loads(pickle.dumps(C())).__class__)"]),
    Case("random module", ["python3", "-c", "import random, sys; print('random' in sys.modules)"]),
    # how the program ends: finalisers, exit codes, threads and streams at exit
    Case("finalisers at exit", ["python3", "{d}/fin.py"], {"fin.py": FINALISERS, "mod.py": MOD}),
    Case("exit code out of range", ["python3", "-c", "import sys; sys.exit(300)"]),
    Case("exit negative", ["python3", "-c", "import sys; sys.exit(-1)"]),
    Case("exit bool", ["python3", "-c", "import sys; sys.exit(True)"]),
    Case("exit huge", ["python3", "-c", "import sys; sys.exit(1 << 70)"]),
    Case("atexit error", ["python3", "-c",
                          "import atexit\nclass F:\n    def __call__(self): 1 / 0\n"
                          "    def __repr__(self): return 'F()'\natexit.register(F())"]),
    Case("daemon thread", ["python3", "-c",
                           "import threading, time\n"
                           "threading.Thread(target=lambda: time.sleep(30), daemon=True).start()\n"
                           "print('main')"]),
    Case("stdout closed", ["python3", "-c",
                           "import os, sys; sys.stdout.write('unflushed'); os.close(1)"]),
    Case("stdout replaced", ["python3", "-c",
                             "import io, sys\nclass D:\n    def __del__(self): print('del')\n"
                             "d = D()\nsys.stdout = io.StringIO()\nprint('hidden')"]),
]  # fmt: skip


def materialise(case: Case, base: Path) -> tuple[list[str], str, dict[str, str] | None]:
    directory = base / case.name.replace(" ", "_")
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in case.files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text, encoding="latin-1" if "latin" in name else "utf-8")
    argv = [a.replace("{d}", str(directory)) for a in case.argv]
    return argv, str(directory), case.env


def written(directory: Path, case: Case) -> dict[str, bytes]:
    """Files the program left in its directory (taken away, for the next run)."""
    found = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in case.files:
            found[path.name] = path.read_bytes()
            path.unlink()
    return found


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_pre_started_interpreter_is_indistinguishable_from_python3(
    agent: Agent, case: Case, tmp_path: Path
) -> None:
    argv, cwd, env = materialise(case, tmp_path)
    real = agent.run(argv, pool=False, stdin=case.stdin, env=env, cwd=cwd, timeout=60)
    real_files = written(Path(cwd), case)
    pooled = agent.pooled(argv, stdin=case.stdin, env=env, cwd=cwd, timeout=60)
    pooled_files = written(Path(cwd), case)
    if (pooled.outcome(), pooled_files) != (real.outcome(), real_files):
        diff = difflib.unified_diff(
            repr((real.outcome(), real_files)).replace("\\n", "\n").splitlines(),
            repr((pooled.outcome(), pooled_files)).replace("\\n", "\n").splitlines(),
            "real python3", "pre-started", lineterm="",
        )  # fmt: skip
        pytest.fail("\n".join(diff))
    assert not real.result["timed_out"]


# -- behaviour around the table ------------------------------------------------------------


SENT_SCRIPT = b"""\
import linecache, os, sys
print(__file__, sys.argv, sys.path[0] == os.path.realpath(os.path.dirname(__file__)))
print(sys.path[0])
print(open(__file__).read() == linecache.getline(__file__, 1) + "".join(
    linecache.getlines(__file__)[1:]))
raise SystemExit(int(sys.argv[1]))
"""


def test_a_script_sent_with_its_exec_is_handed_over_and_runs_as_python3_runs_it(
    agent: Agent, tmp_path: Path
) -> None:
    # ember run: the script comes in the request's files and its path is the program. The
    # interpreter gets the bytes just written with the job; what the program sees (its
    # __file__, sys.path[0] through a symlinked directory, its own source) is python3's.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    script = str(tmp_path / "link" / "sent.py")
    argv, files = ["python3", script, "7"], {script: SENT_SCRIPT}
    real = agent.run(argv, pool=False, files=files, timeout=60)
    pooled = agent.pooled(argv, files=files, timeout=60)
    assert pooled.outcome() == real.outcome()
    assert real.result["exit_code"] == 7 and str(tmp_path / "real") in real.stdout.decode()
    assert agent.pool()["last"]["script_handed"] == 1
    # Not sent with this exec (or not the program): read from the file, as python3 does.
    again = agent.pooled(argv, timeout=60)
    assert again.outcome() == real.outcome()
    assert agent.pool()["last"]["script_handed"] == 0
    other = str(tmp_path / "other.py")
    run = agent.pooled(argv, files={other: b"print(1)\n"}, timeout=60)
    assert run.outcome() == real.outcome()
    assert agent.pool()["last"]["script_handed"] == 0


def test_a_script_sent_twice_in_one_exec_runs_its_last_bytes(agent: Agent, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    script, alias = str(tmp_path / "link" / "twice.py"), str(tmp_path / "real" / "twice.py")

    def run(files: list[tuple[str, bytes]]) -> list[tuple[Kind, bytes]]:
        request = {"op": "exec", "argv": ["python3", script], "pool": True, "files": [
            {"path": path, "data": base64.b64encode(text).decode()} for path, text in files
        ]}  # fmt: skip
        agent.wait_full()
        with agent.connect() as sock:
            write_json(sock, Kind.REQUEST, request)
            frames = []
            while (frame := read_frame(sock)) is not None and frame[0] is not Kind.RESULT:
                frames.append(frame)
        return frames

    assert run([(script, b"print('first')\n"), (script, b"print('last')\n")]) == [
        (Kind.STDOUT, b"last\n")
    ]
    assert agent.pool()["last"]["script_handed"] == 1
    # The same file again under another name, after it: the interpreter reads the file.
    assert run([(script, b"print('first')\n"), (alias, b"print('alias')\n")]) == [
        (Kind.STDOUT, b"alias\n")
    ]
    assert agent.pool()["last"]["script_handed"] == 0


def test_programs_the_pool_cannot_honour_run_as_real_processes(agent: Agent) -> None:
    before = agent.wait_full()
    for argv, env in (
        (["python3", "-O", "-c", "print(__debug__)"], None),
        (["python3", "-c", "import sys; print(sys.flags.hash_randomization)"],
         {"PYTHONHASHSEED": "0"}),
        (["python3", "-X", "utf8", "-c", "import sys; print(sys.flags.utf8_mode)"], None),
    ):  # fmt: skip
        run = agent.run(argv, env=env, timeout=60)
        assert run.result["exit_code"] == 0, run
    assert run.stdout == b"1\n"
    after = agent.pool()
    assert after["served"] == before["served"]
    assert after["fallbacks"] == before["fallbacks"] + 3


def test_other_programs_never_touch_the_pool(agent: Agent) -> None:
    before = agent.wait_full()
    assert agent.run(["true"]).result["exit_code"] == 0
    assert agent.run([sys.executable, "-c", "pass"]).result["exit_code"] == 0  # not the pool's
    after = agent.pool()
    assert (after["served"], after["fallbacks"]) == (before["served"], before["fallbacks"])


def test_a_python3_that_appears_earlier_on_path_is_the_one_that_runs(
    agent: Agent, tmp_path: Path
) -> None:
    # Which python3 PATH names is kept between execs (ember.agent.fscache): a python3 made
    # later in a directory that did not even exist must still win, as execvpe would have it.
    first = tmp_path / "first"
    env = {"PATH": f"{first}:/usr/local/bin:/usr/bin:/bin"}
    argv = ["python3", "-c", "print('pool')"]
    assert agent.pooled(argv, env=env).stdout == b"pool\n"
    # The kept answers: no path looked up. Any change in a watched directory drops them,
    # and on this host /tmp is one (an ancestor of tmp_path) where other tests' sandboxes
    # come and go: so one exec in a few, not every one, may look up again.
    kept = 0
    for _ in range(6):
        lookups = agent.pool()["lookups"]
        assert agent.pooled(argv, env=env).stdout == b"pool\n"
        kept += agent.pool()["lookups"] == lookups
    assert kept >= 3
    first.mkdir()
    shadow = first / "python3"
    shadow.write_text("#!/bin/sh\necho shadow\n")
    shadow.chmod(0o755)
    before = agent.pool()["served"]
    assert agent.run(argv, env=env).stdout == b"shadow\n"
    assert agent.pool()["served"] == before
    shadow.unlink()  # and gone again: the pool's python3 is PATH's choice once more
    assert agent.pooled(argv, env=env).stdout == b"pool\n"


def test_a_rehearsal_leaves_the_interpreters_waiting_and_as_they_were(agent: Agent) -> None:
    # A spare's warm-up: the members programs get first (the started ones, with a heap)
    # read their heap and rehearse a start, then wait for their job again; the program
    # one then runs sees nothing of the rehearsal. The forked ones behind them do not.
    before = agent.wait_full()
    assert before["size"] > STARTED  # the default pool: some members are forked
    warmed = agent.client.warm_pool()
    assert len(warmed) == STARTED and all(pages > 0 for pages in warmed), warmed
    after = agent.pool()
    assert after["ready"] == before["ready"] and after["served"] == before["served"]
    assert after["rehearsed"] == before["rehearsed"] + STARTED
    run = agent.pooled(
        ["python3", "-c", "import sys; print(sorted(k for k in globals() if k[0] != '_'),"
         " '_words' in dir(sys.modules['__main__']), '<rehearsal>' in repr(sys.modules))"]
    )  # fmt: skip
    assert run.stdout == b"['sys'] False False\n", run  # its own import, and nothing else
    with pytest.raises(AgentError, match="unknown pool action None; known: warm, modules"):
        agent.client._run(agent.client._session._call({"op": "pool"}, lambda obj: obj))


def test_the_pool_refills_after_use_and_frees_the_programs_memory(agent: Agent) -> None:
    agent.wait_full()
    run = agent.pooled(["python3", "-c", "import os; print(os.getpid())"])
    pid = int(run.stdout)
    status = agent.wait_full()
    assert status["ready"] == status["size"] and status["holders"] == 0
    assert not Path(f"/proc/{pid}").exists()


FORKED = """\
import ctypes, os, random, threading
libc = ctypes.CDLL(None)
libc.pthread_self.restype = ctypes.c_void_p
glibc_tid = ctypes.c_int.from_address(libc.pthread_self() + 0x2D0).value
print(os.getppid(), os.getsid(0) == os.getpgid(0) == os.getpid() and os.nice(0) == 0,
      glibc_tid == threading.get_native_id() == os.getpid(), random.random())
"""


def test_refills_are_forked_by_the_mother_as_the_agents_own_children(agent: Agent) -> None:
    # The template's members are started; once they are used, the mother forks the refills.
    # Each must be what a started member is: the agent's child (its exit status is the
    # agent's to collect), in a session of its own, with glibc's idea of its thread id
    # right (raise(), pthread_kill, mutex owners read it), random draws of its own, and the
    # agent's priority (the mother and her children's warm-ups run at nice 19).
    status = agent.wait_full()
    assert status["mother"], status["mother_error"]
    forked = status["forked"]
    runs = [agent.pooled(["python3", "-c", FORKED]) for _ in range(status["size"] + 2)]
    assert agent.pool()["forked"] >= forked + 2
    lines = [run.stdout.split() for run in runs]
    assert all(line[:3] == [str(agent.proc.pid).encode(), b"True", b"True"] for line in lines), runs
    assert len({line[3] for line in lines}) == len(lines)  # no two share a random stream
    # A forked member's death by a signal is seen as a started one's is.
    run = agent.pooled(["python3", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    assert run.result["signal"] == signal.SIGTERM, run


OOM_ADJ = "print(open('/proc/self/oom_score_adj').read().strip())"


def _oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def test_waiting_interpreters_are_the_oom_killers_first_choice_and_programs_are_not(
    agent: Agent,
) -> None:
    # The guest has no swap. When a program outgrows the memory left, the OOM killer must
    # take a waiting interpreter (the agent makes another when idle), not the program or
    # the run_code worker, which it would pick by size. A program, started or forked
    # member alike, is weighed as a real python3 is, and has no descriptor more.
    status = agent.wait_full()
    assert status["mother"], status["mother_error"]
    waiting = [
        pid
        for pid in _children(agent.proc.pid)
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:2] == [b"-c"]
    ]
    assert len(waiting) > status["size"]  # the members, their holders and the mother
    # the mother (no heap, no holder: one process) goes after the members, whose refills
    # she forks
    scores = Counter(_oom_score_adj(pid) for pid in waiting)
    assert scores == {1000: len(waiting) - 1, 900: 1}, scores
    real = agent.run(["python3", "-c", OOM_ADJ], pool=False)
    assert real.stdout.strip() == str(_oom_score_adj(agent.proc.pid)).encode(), real
    forked = status["forked"]
    for _ in range(status["size"] + 1):  # the last ones forked by the mother
        assert agent.pooled(["python3", "-c", OOM_ADJ]).stdout == real.stdout
    assert agent.pool()["forked"] > forked
    show = agent.pooled(["python3", "-c", SHOW]).stdout.splitlines()
    assert show[-2] == agent.run(["python3", "-c", SHOW], pool=False).stdout.splitlines()[-2]


MARK_AND_GIVE_BACK = """
import os
from ember.agent import pystart
def score(): return open("/proc/self/oom_score_adj").read().strip()
open("/proc/self/oom_score_adj", "w").write("100")  # what the agent would have
adj = pystart._expendable()
marked = score()
pystart._needed(adj)
print(marked, score(), adj[1].decode(), *sorted(os.listdir("/proc/self/fd")))
"""


def test_a_program_gets_back_the_oom_score_its_interpreter_inherited() -> None:
    # Not 0: the agent's own (a real python3 inherits it), and no descriptor is left open.
    done = subprocess.run(
        [sys.executable, "-c", MARK_AND_GIVE_BACK], capture_output=True, text=True, check=True
    )
    # the descriptors: the standard three and the one listing them
    assert done.stdout.split() == ["1000", "100", "100", "0", "1", "2", "3"], done


def test_the_first_fill_starts_two_and_forks_the_rest_warmed_before_ready(
    tmp_path: Path,
) -> None:
    # A template's pool past STARTED is forked by the mother, each member warmed (its
    # copy-on-write faults taken) before it says ready, so before the snapshot; started
    # members carry the heap, forked ones none. Refills forked later warm up after ready.
    a = start_agent(tmp_path, "--pool", "3")
    try:
        status = a.first_fill_done()
        assert status["mother"], status["mother_error"]
        assert (status["size"], status["ready"], status["forked"]) == (3, 3, 1), status
        assert [w > 0 for w in status["warmed"]] == [False, False, True], status
        # The probe (not a member: forked stays 1) found the pages a program writes, and the
        # forked member's warm-up wrote those of them it has mapped.
        assert 0 < status["warmed"][2] <= status["profile"], status
        assert [h > 0 for h in status["heaps_mib"]] == [True, True, False], status
        # The forked member serves its program as the others do, in turn after them.
        runs = [a.pooled(["python3", "-c", "import os; print(os.getppid())"]) for _ in range(3)]
        assert {run.stdout for run in runs} == {f"{a.proc.pid}\n".encode()}, runs
        status = a.wait_full()
        assert status["forked"] >= 3 and status["warmed"] == [0, 0, 0], status
        stop_agent(a)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


def test_an_exec_finding_the_pool_empty_waits_for_a_fork_not_a_real_python3(
    tmp_path: Path,
) -> None:
    # Refills wait for 30 s of idleness here, so only the exec's own wait can bring the third
    # member in time: it is forked while the request is in flight and serves it.
    a = start_agent(tmp_path, "--pool", "2", env={"EMBER_POOL_IDLE_S": "30"})
    try:
        status = a.first_fill_done()  # the mother comes last
        assert status["mother"], status["mother_error"]
        for _ in range(3):
            run = a.run(["python3", "-c", "import sys; print(sys.argv)"])
            assert run.stdout == b"['-c']\n", run
        status = a.pool()
        assert status["served"] == 3 and status["forked"] == 1, status
        assert status["ready"] == 0  # nothing else was refilled: the sandbox never sat idle
        stop_agent(a)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


def _mother_pid(agent: Agent) -> int:
    for pid in _live_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == agent.proc.pid and b"mother" in argv:
            return pid
    raise AssertionError("no mother among the agent's children")


@contextlib.contextmanager
def frozen(pid: int, name: str) -> Iterator[None]:
    """``pid`` frozen by the cgroup freezer (v1, else v2): the SIGCONT the pool sends a member
    it stopped does not thaw it. Afterwards it, and any child it had meanwhile, go back."""
    v1 = "/sys/fs/cgroup/freezer"
    if os.path.isdir(v1):
        root, switch, on, off = v1, "freezer.state", "FROZEN", "THAWED"
    else:
        root, switch, on, off = "/sys/fs/cgroup", "cgroup.freeze", "1", "0"
    group = Path(root, name)
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        (group / switch).write_text(on)
        try:
            yield
        finally:
            (group / switch).write_text(off)
    finally:
        deadline = time.monotonic() + 30
        while tasks := (group / "cgroup.procs").read_text().split():  # a fork may be under way
            assert time.monotonic() < deadline, tasks
            for task in tasks:
                with contextlib.suppress(OSError):  # it may have ended meanwhile
                    Path(root, "cgroup.procs").write_text(task)
            time.sleep(0.05)
        group.rmdir()


def _nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[16])


def test_a_burst_of_execs_on_an_empty_pool_waits_for_the_forks_in_turn(tmp_path: Path) -> None:
    # Forks come one after another, so the second exec of a burst may wait one FORK_WAIT_S
    # longer than the first. The mother is frozen for 1.25 FORK_WAIT_S: past the first
    # exec's wait (it starts a real python3), within the second's, which a fork then serves.
    # With one FORK_WAIT_S for both, both would start real processes. While execs wait for
    # her, the mother is not background work: she runs at the agent's priority, not nice 19
    # (beside the first exec's python3 she would hardly run, and the second would run out).
    a = start_agent(tmp_path, "--pool", "2", env={"EMBER_POOL_IDLE_S": "30"})
    runs: list[Run] = []

    def one(n: int) -> None:
        runs.append(a.run(["python3", "-c", f"print({n})"]))

    try:
        status = a.first_fill_done()
        assert status["mother"], status["mother_error"]
        for _ in range(2):
            assert a.run(["python3", "-c", "pass"]).result["exit_code"] == 0
        mother = _mother_pid(a)
        assert _nice(mother) == 19  # idle: background
        burst = [threading.Thread(target=one, args=(n,)) for n in range(2)]
        started = time.monotonic()
        with frozen(mother, f"ember-test-{os.getpid()}"):
            for thread in burst:
                thread.start()
            wait_for(lambda: _nice(mother) == os.getpriority(os.PRIO_PROCESS, 0), 10,
                     "the mother to leave the background for the waiting execs")  # fmt: skip
            time.sleep(max(0.0, started + 1.25 * FORK_WAIT_S - time.monotonic()))
        for thread in burst:
            thread.join(60)
        assert sorted(run.stdout for run in runs) == [b"0\n", b"1\n"], runs
        status = a.pool()
        assert status["served"] >= 3 and status["forked"] >= 1, status
        wait_for(lambda: _nice(mother) == 19, 10, "the mother to go back to the background")
        stop_agent(a)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


def test_a_timeout_kills_the_program_and_its_holder(agent: Agent) -> None:
    agent.wait_full()
    script = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(60)"
    run = agent.pooled(["python3", "-c", script], timeout=1.0)
    assert run.result["timed_out"] and run.result["signal"] == signal.SIGKILL
    pgid = int(run.stdout)
    deadline = time.monotonic() + 10
    while any(_pgid(p) == pgid for p in _live_pids()):
        assert time.monotonic() < deadline, "the program's group outlived the timeout"
        time.sleep(0.05)


def test_a_bad_cwd_is_refused_like_a_real_process(agent: Agent) -> None:
    agent.wait_full()
    with pytest.raises(Exception) as pooled:
        agent.client.exec(["python3", "-c", "pass"], cwd="/no/such/dir")
    with pytest.raises(Exception) as real:
        agent.client.exec(["env", "python3", "-c", "pass"], cwd="/no/such/dir")
    assert str(pooled.value).replace("'python3'", "'env'") == str(real.value)
    assert agent.pool()["ready"] == agent.pool()["size"]  # nothing was used up


def test_a_program_that_allocates_past_the_heap_just_runs(agent: Agent) -> None:
    code = "b = bytearray(64 << 20); b[-1] = 1; print(len(b), sum(b))"
    run = agent.pooled(["python3", "-c", code])
    assert run.stdout == f"{64 << 20} 1\n".encode() and run.result["exit_code"] == 0


END = """\
import os, sys, types
sys.path.insert(0, sys.argv[1])
from ember.agent import pyjob

class Noisy:
    def __init__(self, name):
        self.name = name

    def __del__(self):
        os.write(1, f"del {self.name}\\n".encode())

template = types.ModuleType("template_mod")
template.obj = Noisy("template")
sys.modules["template_mod"] = template
job = pyjob.Job({}, {})
job.baseline = set(sys.modules)
program = types.ModuleType("program_mod")
program.obj = Noisy("program")
sys.modules["program_mod"] = program
del program
job.end(SystemExit(eval(sys.argv[2])))
os.write(1, b"returned\\n")
"""


@pytest.mark.parametrize(
    ("code", "stdout", "status"),
    [
        ("7", b"del program\n", 7),  # the program's objects finalised, the template's left
        ("None", b"del program\n", 0),
        ("'bye'", b"returned\n", None),  # python3 prints the message: its own finalisation
    ],
)
def test_a_program_ends_without_tearing_the_template_down(
    code: str, stdout: bytes, status: int | None
) -> None:
    run = subprocess.run(
        [PYTHON, "-c", END, str(SRC), code], capture_output=True, timeout=60, check=False
    )
    assert run.stderr == b""
    if status is None:  # end() returned: python3's own exit tears everything down afterwards
        assert run.stdout.startswith(stdout) and b"del template" in run.stdout
        assert run.returncode == 0
    else:
        assert (run.stdout, run.returncode) == (stdout, status)


def test_a_program_that_kills_its_own_interpreter(agent: Agent) -> None:
    run = agent.pooled(["python3", "-c", "import os, signal; os.killpg(0, signal.SIGKILL)"])
    assert run.result["signal"] == signal.SIGKILL
    agent.wait_full()  # the pool carries on


def test_a_missing_preload_module_fails_the_pool_with_its_reason(tmp_path: Path) -> None:
    a = start_agent(tmp_path, "--preload", "no_such_module_xyz", "--pool", "1")
    try:
        status = a.first_fill_done()
        assert status["state"] == "failed"
        assert "no_such_module_xyz" in status["error"] and "ModuleNotFoundError" in status["error"]
        run = a.run(["python3", "-c", "print(6 * 7)"], timeout=60)
        assert run.stdout == b"42\n"  # exec still works, with a real process
        stop_agent(a)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


DIES_ONCE = """\
import os, pathlib, signal
marker = pathlib.Path(__file__).with_suffix(".died")
if not marker.exists():
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)
"""

EXITS = """\
import os, sys
sys.stderr.write("the first line\\nstarting failed here\\n")
sys.stderr.flush()
os._exit(3)
"""


def _first_fill(tmp_path: Path, module: str, source: str) -> dict[str, Any]:
    """An in-process pool of one preloading ``module``; its status once the first fill ended."""
    from ember.agent.execute import default_env
    from ember.agent.pool import InterpreterPool

    (tmp_path / f"{module}.py").write_text(source)
    env = default_env() | {"PYTHONPATH": str(tmp_path)}
    pool = InterpreterPool(1, preload=(module,), env=env)
    pool.start()
    try:
        deadline = time.monotonic() + 60
        while (status := pool.status())["state"] == "starting":
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        return status
    finally:
        pool.close()


def test_a_first_start_that_dies_is_started_again(tmp_path: Path) -> None:
    """One lost start (the guest's OOM killer while the template boots, say) must not fail
    the template: the first fill tries again, and only a start that keeps dying fails it."""
    status = _first_fill(tmp_path, "dies_once", DIES_ONCE)
    assert (tmp_path / "dies_once.died").exists()  # it did die once
    assert status["state"] == "ready" and status["ready"] == 1, status


def test_a_start_that_keeps_dying_fails_the_pool_saying_how(tmp_path: Path) -> None:
    status = _first_fill(tmp_path, "exits", EXITS)
    assert status["state"] == "failed"
    assert status["error"] == (
        "a pre-started interpreter exited with status 3 while starting: starting failed here"
    )


def test_preloaded_modules_are_there_and_pool_only_modules_are_not(tmp_path: Path) -> None:
    a = start_agent(tmp_path, "--preload", "json,random", "--pool", "1")
    try:
        a.wait_full()
        names = "('json', 'random', 'ctypes', '_socket')"
        code = f"import sys; print(sorted(m for m in {names} if m in sys.modules))"
        run = a.pooled(["python3", "-c", code])
        assert run.stdout == b"['json', 'random']\n", run
        a.wait_full()  # the member that ran the program is gone; its refill answers
        modules = a.client.pool_modules()  # named on request; a ping only counts them
        assert {"json", "json.decoder", "random"} <= set(modules), modules
        assert "ctypes" not in modules and a.pool()["preloaded_count"] == len(modules)
        stop_agent(a)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            found.append(int(entry))
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="page frame numbers need CAP_SYS_ADMIN")
def test_the_agent_says_where_the_warm_heaps_huge_pages_are(tmp_path: Path) -> None:
    """Op ``pool`` ``huge``, what a template build records: the 2 MiB pages of the worker's
    and the waiting interpreters' heaps, as the walk finds them in each of its children."""
    a = start_agent(tmp_path, "--heap-mib", "64", "--pool", "1")
    try:
        a.wait_full()
        assert a.client.run_code("6*7").value == "42"  # the worker is up, its heap touched
        huge = a.client.pool_huge()
        assert huge == hugemap.huge_chunks(_children(a.proc.pid)), huge
        assert len(huge) >= 4  # 64 MiB between two interpreters, in 2 MiB pages
        assert all(chunk % hugemap.HUGE_SIZE == 0 for chunk in huge)
        stop_agent(a)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


def test_reseeding_gives_a_template_copy_its_own_random_stream() -> None:
    random.seed(7)
    template_draw = random.random()
    random.seed(7)  # a sibling restored from the same template: the same state
    pybase._reseed()
    assert random.random() != template_draw


def test_a_preloaded_logging_counts_relative_times_from_the_program_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging

    monkeypatch.setattr(logging, "_startTime", time.time() - 3600.0)  # imported in a template
    pybase._restart_clocks()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert 0 <= record.relativeCreated < 5000
    with monkeypatch.context() as m:
        m.delitem(sys.modules, "logging")  # not preloaded: nothing to restart, no import
        pybase._restart_clocks()
        assert "logging" not in sys.modules


def _live_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2] != "Z":
                pids.append(int(entry))
    return pids


def _pgid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2 :].split()[2])


def test_a_template_whose_pool_failed_is_a_build_error(tmp_path: Path) -> None:
    """template_warm.wait_warm refuses to snapshot an agent whose pool could not start."""
    from ember import template_warm
    from ember.errors import SandboxError

    a = start_agent(tmp_path, "--preload", "no_such_module_xyz", "--pool", "1")

    class FakeVmm:
        connect = staticmethod(a.connect)

        @staticmethod
        def exited() -> bool:
            return False

        @staticmethod
        def console_tail(lines: int) -> str:
            return "[ 9.1] ember-agent: interpreter pool: preloading failed\n[ 9.2] unrelated line"

    try:
        with pytest.raises(SandboxError) as caught:
            template_warm.wait_warm(FakeVmm())  # type: ignore[arg-type]
        message = str(caught.value)
        assert "pre-started interpreters failed: preloading 'no_such_module_xyz'" in message
        assert message.endswith(
            "\n  guest console: [ 9.1] ember-agent: interpreter pool: preloading failed"
        )
        stop_agent(a)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


TRIM = """\
import sys
from ember.agent.pyclone import _trim_heap

def anon_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

block = bytearray(48 << 20)  # every page written; freed into a heap that keeps it (MALLOC_*)
del block
kept = anon_kib()
_trim_heap()
print(kept, anon_kib())
"""


def test_the_mothers_freed_heap_pages_are_given_back_before_she_forks() -> None:
    # Under the pool's malloc settings freed memory stays resident; the mother gives hers
    # back (each fork would copy an entry for every page, and the template would hold it).
    from ember.agent.heap import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(SRC)}
    out = subprocess.run([PYTHON, "-c", TRIM], env=env, capture_output=True, check=True)
    kept, trimmed = (int(x) for x in out.stdout.split())
    assert kept > 40 << 10, out  # the settings kept the freed block
    assert kept - trimmed > 40 << 10, out  # and the trim gave it back


def test_a_replacement_run_code_worker_is_a_pre_started_interpreter(agent: Agent) -> None:
    # A dead worker's replacement is handed to a pool member, as a Python program is: no
    # fresh python3 importing the preload (~30 s in the guest). It is the pool's python3,
    # serves cells as the first one did, and its stdin is not the agent's socket.
    agent.wait_full()
    run = agent.client.run_code
    assert run("import os, sys\nfirst = os.getpid()").error is None
    first = int(run("first").value or "0")
    # The first worker has a holder of its own (it clones one, as a member does): its death
    # leaves its memory to the holder, which the pool frees when the agent is idle.
    group = [pid for pid in _live_pids() if _pgid(pid) == first]
    assert len(group) == 2, group
    served = agent.pool()["served"]
    crashed = run("import os\nos._exit(3)")
    assert crashed.error is not None and crashed.error.type == "WorkerCrashed", crashed
    fresh = run(
        "import os, sys\nos.getpid(), sys.executable, sys.stdin.read(), 'first' in globals()"
    )
    assert fresh.error is None, fresh
    pid, executable, stdin, kept = eval(fresh.value or "")
    assert agent.client.ping()["worker_replacements"] == [1, 1]
    assert (executable, stdin, kept) == (PYTHON, "", False)
    assert agent.pool()["served"] == served + 1
    assert run("6 * 7").value == "42" and run("os.getpid()").value == str(pid)
    # Its own death ends it as any member's program ends: the holder goes back to the pool.
    crashed = run("import os\nos._exit(4)")
    assert crashed.error is not None and "status 4" in crashed.error.message
    assert run("1 + 1").value == "2"
    status = agent.wait_full()
    assert status["holders"] == 0 and not Path(f"/proc/{pid}").exists()
    assert not [p for p in group if Path(f"/proc/{p}").exists()]  # the first's holder too


def test_cells_served_over_the_code_ring_hold_refills_off_as_requests_do() -> None:
    # The agent never sees a ring-served run_code: only the worker's CODE_CELLS word says
    # one runs (odd) or ran (changed). A refill must wait for the cells to stop, then for
    # the idle time, as after a request; with no cells it starts after idle_s as before.
    from ember.agent.pool import InterpreterPool

    pool = InterpreterPool(2, idle_s=0.1)
    cells = [7]
    looks: list[int] = []

    def read() -> int:
        looks.append(cells[0])
        return cells[0]

    pool.watch_cells(read)
    started: list[float] = []
    with pool._cond:
        pool._first_fill_done = True
        pool._ready = [object()]  # type: ignore[list-item]  # one short: a refill is wanted
        pool._idle_since = time.monotonic() - 10  # long idle: only the cells hold it off
    cells[0] = 9  # a cell began and is still running

    def start_one(first: bool) -> object:
        started.append(time.monotonic())
        return object()

    pool._start_one = start_one  # type: ignore[assignment]
    thread = threading.Thread(target=pool._loop, daemon=True)
    thread.start()
    try:
        time.sleep(0.6)  # several idle_s: a running cell holds the refill off throughout
        assert started == [] and len(looks) >= 3
        cells[0] = 10  # it ended: the idle time counts from the look that saw it
        wait_for(lambda: started, 10, "the refill once the cells stopped")
        assert looks[-1] == 10
    finally:
        with pool._cond:
            pool._closed = True
            pool._cond.notify_all()
        thread.join(10)


def test_the_end_of_a_request_wakes_the_pools_thread_only_for_work_it_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A wake-up the pool's thread does not need costs the next request a GIL hand-over
    # storm in the guest; one it needs (work wanted, waiting without a deadline) must come,
    # or a refill would wait for the next request. A real thread in PoolFiller._loop.
    from ember.agent import poolfill
    from ember.agent.pool import InterpreterPool

    pool = InterpreterPool(2, idle_s=0.05)
    wakes: list[float] = []
    cond = pool._cond
    real_notify = cond.notify_all

    def counted_notify() -> None:
        wakes.append(time.monotonic())
        real_notify()

    cond.notify_all = counted_notify  # type: ignore[method-assign]
    started: list[bool] = []
    with cond:
        pool._first_fill_done = True
        pool._ready = [object(), object()]  # type: ignore[list-item]  # full: no work

    def start_one(first: bool) -> object:
        started.append(first)
        return object()  # a member, as far as the loop looks

    pool._start_one = start_one  # type: ignore[assignment]
    thread = threading.Thread(target=pool._loop, daemon=True)
    thread.start()
    try:
        wait_for(lambda: pool._unbounded_wait, 10, "the pool's thread to wait")  # nothing to do
        for _ in range(3):
            pool.busy()
            pool.idle()
        assert wakes == [] and started == []
        pool.busy()
        with cond:
            pool._ready.pop()  # an exec took a member: a refill is wanted once idle
            pool._handed[4242] = 4343  # its program's holder, freed once idle
        killed: list[int] = []
        monkeypatch.setattr(poolfill, "kill_holder", killed.append)
        pool.release(type("Reaped", (), {"pid": 4242})())  # type: ignore[arg-type]
        # Inside the request: its end wakes the thread, once.
        assert wakes == [] and pool._holders == [4343]
        pool.idle()
        assert len(wakes) == 1
        wait_for(lambda: started == [False], 10, "the refill")  # started, after idle_s
        wait_for(lambda: killed == [4343], 10, "the holder's kill")
        # Outside a request (a run_code worker died on its own) a holder wakes a thread
        # that waits for nothing, at once.
        wait_for(lambda: pool._unbounded_wait, 10, "the pool's thread to wait again")
        before = len(wakes)  # (the refill's end notified whoever waits for a member)
        pool.free_later(4444)
        assert len(wakes) == before + 1
        wait_for(lambda: killed == [4343, 4444], 10, "the second holder's kill")
    finally:
        with cond:
            pool._closed = True
            real_notify()
        thread.join(10)

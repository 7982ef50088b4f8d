"""The run daemon's thin client (ember.cli.runclient) against a fake daemon, no KVM: every
command line it takes is sent exactly as the full CLI (argparse) sends it, and the fast path
imports neither argparse nor typing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.cli import main as cli_main
from ember.cli import run as cli_run
from ember.cli import runclient

SCRIPT = b"print('hi')\n"


class FakeDaemon:
    """Accepts any number of runs; records each request line, answers exit ``exit``."""

    def __init__(self, directory: Path) -> None:
        self.lines: list[bytes] = []
        self.exit = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(runclient.socket_path(directory))
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.lines.append(data)
                end = runclient.end_payload(self.exit, "")
                conn.sendall(runclient.HEADER.pack(runclient.STDOUT, 3) + b"ok\n")
                conn.sendall(runclient.HEADER.pack(runclient.END, len(end)) + end)

    def close(self) -> None:
        self._listener.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeDaemon]:
    directory = tmp_path_factory.mktemp("run")
    (directory / "script.py").write_bytes(SCRIPT)
    fake = FakeDaemon(directory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(runclient.ENABLE_ENV, "1")
        mp.setenv(runclient.DIR_ENV, str(directory))
        mp.delenv("EMBER_SERVER", raising=False)
        mp.chdir(directory)
        yield fake
    fake.close()


def fast(daemon: FakeDaemon, words: list[str]) -> bytes | None:
    """What the thin client sends for ``words``; None if it leaves them to the full CLI."""
    before = len(daemon.lines)
    code = runclient.fast_main(words)
    if code is None:
        assert len(daemon.lines) == before  # declined: nothing was sent
        return None
    assert code == daemon.exit
    return daemon.lines[-1]


def full(daemon: FakeDaemon, words: list[str], monkeypatch: pytest.MonkeyPatch) -> bytes:
    """What the full CLI (argparse, ember.cli.run, ember.cli.runner) sends for ``words``."""

    def in_process(_args: object) -> None:
        raise AssertionError("the full CLI would run this in-process, not through the daemon")

    monkeypatch.setattr(runclient, "fast_main", lambda _words: None)
    monkeypatch.setattr(cli_run, "_sandbox", in_process)
    before = len(daemon.lines)
    assert cli_main.main(words) == daemon.exit
    assert len(daemon.lines) == before + 1
    return daemon.lines[-1]


@pytest.mark.parametrize(
    ("words", "argv", "timeout", "template"),
    [
        (["run", "script.py"], ["python3", "/tmp/ember-run/script.py"], None, None),
        (
            ["run", "--timeout", "5", "script.py", "--timeout", "9", "-h"],
            ["python3", "/tmp/ember-run/script.py", "--timeout", "9", "-h"],
            5.0,
            None,
        ),
        (["run", "--template=sci", "./script.py", "x"],
         ["python3", "/tmp/ember-run/script.py", "x"], None, "sci"),
        (["exec", "--", "ls", "-l"], ["ls", "-l"], None, None),
        (["exec", "--timeout=2.5", "--template", "t", "sh", "-c", "exit 3"],
         ["sh", "-c", "exit 3"], 2.5, "t"),
    ],
)  # fmt: skip
def test_the_command_lines_it_takes(
    daemon: FakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
    words: list[str],
    argv: list[str],
    timeout: float | None,
    template: str | None,
) -> None:
    sent = fast(daemon, words)
    assert sent is not None
    request = json.loads(sent)
    assert request["argv"] == argv
    assert request["timeout"] == timeout and request["options"]["template"] == template
    assert request["fingerprint"] == runclient.fingerprint()
    if words[0] == "run":
        assert request["upload"] == ["/tmp/ember-run/script.py", "cHJpbnQoJ2hpJykK"]
    else:
        assert request["upload"] is None
    assert sent == full(daemon, words, monkeypatch)


@pytest.mark.parametrize(
    "words",
    [
        [], ["run"], ["exec"], ["exec", "--"], ["ps"], ["run", "-h"], ["exec", "--help"],
        ["run", "--mem", "256", "script.py"], ["run", "--boot", "script.py"],
        ["exec", "--id", "sb-1", "true"], ["exec", "--internet", "true"],
        ["run", "--timeout", "soon", "script.py"], ["run", "--timeout", "-5", "script.py"],
        ["run", "--ti", "5", "script.py"], ["run", "--template=", "script.py"],
        ["run", "missing.py"], ["run", "-", "x"], ["run", "."], ["run", "script.py", "--", "x"],
        ["exec", "--", "ls", "--", "x"],
    ],
)  # fmt: skip
def test_what_it_leaves_to_the_full_cli(daemon: FakeDaemon, words: list[str]) -> None:
    assert fast(daemon, words) is None


def test_nothing_is_taken_when_the_daemon_is_switched_off(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(runclient.ENABLE_ENV, "0")
    assert fast(daemon, ["exec", "true"]) is None
    monkeypatch.setenv(runclient.ENABLE_ENV, "1")
    monkeypatch.setenv("EMBER_SERVER", "http://127.0.0.1:7777")
    assert fast(daemon, ["exec", "true"]) is None


def test_a_script_over_the_limit_is_left_to_the_full_cli(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runclient, "MAX_SCRIPT", len(SCRIPT) - 1)
    assert fast(daemon, ["run", "script.py"]) is None


WORDS = st.sampled_from(
    [
        "--timeout", "--timeout=2.5", "--timeout=-1", "5", "-5", "1e3", "inf", "nan", "x",
        "--template", "--template=sci", "sci", "--", "-", "-h", "--mem", "256", "--boot",
        "script.py", "a b", "--ti", "--temp", "", "-x", "--timeout=", "=",
    ]
)  # fmt: skip


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(command=st.sampled_from(["run", "exec"]), rest=st.lists(WORDS, max_size=6))
def test_whatever_it_takes_the_full_cli_sends_the_same(
    daemon: FakeDaemon, command: str, rest: list[str]
) -> None:
    words = [command, *rest]
    sent = fast(daemon, words)
    if sent is None:
        return
    with pytest.MonkeyPatch.context() as mp:
        assert sent == full(daemon, words, mp), words


def test_the_fast_path_imports_neither_argparse_nor_typing_nor_json(daemon: FakeDaemon) -> None:
    probe = (
        "import sys\nfrom ember.cli.main import main\ncode = main(['run', 'script.py'])\n"
        "print(code, *(m in sys.modules for m in ('argparse', 'typing', 'json', 're')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=dict(os.environ),
        timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.split()[-5:] == ["0", "False", "False", "False", "False"], done


ANY_TEXT = st.text(st.characters(blacklist_categories=()))  # lone surrogates too
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | ANY_TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@given(JSON_VALUES)
def test_a_request_is_the_json_the_json_module_writes(value: object) -> None:
    # The daemon reads requests with json.loads: the client's own encoder (which spares
    # every run importing json and re) must write exactly what json.dumps writes, lone
    # surrogates (argv's undecodable bytes) and control characters included.
    assert runclient.json_text(value) == json.dumps(value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: "x"}, b"bytes", {"x"}])
def test_what_json_cannot_hold_is_refused(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        runclient.json_text(bad)


@given(st.integers(-(1 << 31), (1 << 31) - 1), st.text())
def test_an_end_frame_carries_the_status_and_the_message(code: int, message: str) -> None:
    got = runclient.read_end(runclient.end_payload(code, message))
    assert got == (code, message.encode("utf-8", "replace").decode("utf-8", "replace"))


def test_a_bad_end_frame_is_a_connection_error() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(runclient.HEADER.pack(runclient.END, 2) + b"7x")
        with pytest.raises(ConnectionError, match="bad END frame"):
            runclient._print_frames(b, sys.stdout.buffer, sys.stderr.buffer)


@pytest.mark.parametrize("command", ["run", "exec"])
def test_the_full_cli_defaults_are_the_clients(command: str) -> None:
    """The shape a bare line asks for is the same whichever path parses it: the full CLI's
    option defaults are :data:`runclient.SHAPE_DEFAULTS`, key for key."""
    from ember.cli import runner

    assert set(runner.SHAPE) == set(runclient.SHAPE_DEFAULTS)
    args = cli_main.build_parser().parse_args([command, "x"])
    assert runner.shape_options(args) == runclient.SHAPE_DEFAULTS


def test_the_run_scripts_directory_is_the_one_the_agent_makes_in_the_template() -> None:
    # A literal in the client (it imports nothing it can avoid): a change on one side only
    # would put every run's script where no template has a directory ready.
    from ember.protocol import RUN_DIR

    assert runclient.GUEST_DIR == RUN_DIR
    assert runclient.script_command("a.py", ["x"]) == ["python3", f"{RUN_DIR}/a.py", "x"]

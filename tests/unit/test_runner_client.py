"""The run daemon's client against a fake daemon (no KVM): what it prints, what it exits
with, and when it falls back to running in-process instead."""

from __future__ import annotations

import argparse
import io
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember.cli import runclient, runner


def args(**overrides: object) -> argparse.Namespace:
    base: dict[str, object] = dict(
        boot=False, internet=False, allow=[], mem=None, vcpus=1, cpus=None, memory=None,
        pids=None, template=None, timeout=None,
    )  # fmt: skip
    base.update(overrides)
    return argparse.Namespace(**base)


@pytest.fixture
def fake_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Callable[[socket.socket, dict[str, object]], None]], list[dict]]]:
    """Serve one connection with ``answer(conn, request)``; the requests seen are returned."""
    monkeypatch.setenv(runclient.ENABLE_ENV, "1")
    monkeypatch.setenv(runclient.DIR_ENV, str(tmp_path))
    monkeypatch.delenv("EMBER_SERVER", raising=False)
    started: list[int] = []
    monkeypatch.setattr(runner, "start_daemon", lambda: started.append(1))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(runclient.socket_path(tmp_path))
    listener.listen(1)
    threads: list[threading.Thread] = []

    def serve(answer: Callable[[socket.socket, dict[str, object]], None]) -> list[dict]:
        seen: list[dict] = []

        def one() -> None:
            conn, _ = listener.accept()
            with conn:
                request = json.loads(runner._read_line(conn))
                seen.append(request)
                answer(conn, request)

        thread = threading.Thread(target=one, daemon=True)
        thread.start()
        threads.append(thread)
        return seen

    yield serve
    listener.close()
    for thread in threads:
        thread.join(5)


def frame(conn: socket.socket, kind: bytes, payload: bytes) -> None:
    runner._send(conn, kind, payload)


def test_frames_are_printed_and_the_end_is_the_exit_status(
    fake_daemon: Callable, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    def answer(conn: socket.socket, request: dict[str, object]) -> None:
        frame(conn, runclient.STDOUT, b"out\n")
        frame(conn, runclient.STDERR, b"err\n")
        frame(conn, runclient.END, runclient.end_payload(7, "ember: said"))

    seen = fake_daemon(answer)
    code = runner.try_run(args(timeout=5.0), ["python3", "/tmp/x.py"], ("/tmp/x.py", b"\x00\xff"))
    assert code == 7
    out, err = capfdbinary.readouterr()
    assert out == b"out\n" and err == b"err\nember: said\n"
    [request] = seen
    assert request["argv"] == ["python3", "/tmp/x.py"] and request["timeout"] == 5.0
    assert request["fingerprint"] == runclient.fingerprint()
    assert request["upload"] == ["/tmp/x.py", "AP8="]  # the bytes, exactly


def test_a_stale_daemon_means_in_process_and_a_new_daemon(
    fake_daemon: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_daemon(lambda conn, _r: frame(conn, runclient.STALE, b""))
    started: list[int] = []
    monkeypatch.setattr(runner, "start_daemon", lambda: started.append(1))
    assert runner.try_run(args(), ["true"], None) is None
    assert started == [1]


def test_a_daemon_that_hangs_up_before_any_output_means_in_process(fake_daemon: Callable) -> None:
    fake_daemon(lambda conn, _r: None)  # accepted, then closed: an idle exit's backlog
    assert runner.try_run(args(), ["true"], None) is None


def test_a_daemon_that_hangs_up_after_output_is_an_error_not_a_second_run(
    fake_daemon: Callable,
) -> None:
    fake_daemon(lambda conn, _r: frame(conn, runclient.STDOUT, b"partial"))
    with pytest.raises(ConnectionError):
        runner.try_run(args(), ["true"], None)


def test_an_unknown_frame_is_refused(fake_daemon: Callable) -> None:
    def answer(conn: socket.socket, _r: dict[str, object]) -> None:
        frame(conn, runclient.STDOUT, b"x")
        frame(conn, b"?", b"")

    fake_daemon(answer)
    with pytest.raises(ConnectionError, match="unknown frame"):
        runner.try_run(args(), ["true"], None)


def test_no_daemon_starts_one_and_runs_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(runclient.ENABLE_ENV, "1")
    monkeypatch.setenv(runclient.DIR_ENV, str(tmp_path / "none"))
    monkeypatch.delenv("EMBER_SERVER", raising=False)
    started: list[int] = []
    monkeypatch.setattr(runner, "start_daemon", lambda: started.append(1))
    assert runner.try_run(args(), ["true"], None) is None
    assert started == [1]


@pytest.mark.parametrize(
    "overrides",
    [{"boot": True}, {"internet": True}, {"allow": ["10.0.0.5:443"]}, {"id": "sb-1"}],
)
def test_runs_a_spare_cannot_serve_are_not_the_daemons(overrides: dict[str, object]) -> None:
    assert runner.daemon_options(args(**overrides)) is None
    assert runner.daemon_options(args()) is not None


def test_the_switches_that_keep_runs_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runclient.ENABLE_ENV, "0")
    assert not runclient.enabled()
    monkeypatch.setenv(runclient.ENABLE_ENV, "1")
    monkeypatch.setenv("EMBER_SERVER", "http://127.0.0.1:7777")
    assert not runclient.enabled()
    monkeypatch.delenv("EMBER_SERVER")
    assert runclient.enabled()


def test_a_run_the_daemon_fails_on_ends_with_a_message_not_a_hang(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real daemon's side: a request it raises on, however (here a ValueError, as the
    SDK raised for ``--timeout 0``), still ends the client's wait, with the error, even
    while the hang-up watcher (a thread in ``recv`` on the connection) holds it open."""
    watching = threading.Event()

    def execute(*_args: object) -> int:
        def watch() -> None:  # as runner._opener's watcher does
            watching.set()
            runner._on_hang_up(daemon_end, lambda: None)

        threading.Thread(target=watch, daemon=True).start()
        watching.wait(5)
        raise ValueError("timeout must be positive seconds, got 0.0")

    monkeypatch.setattr(runner, "execute", execute)
    daemon_end, served = socket.socketpair()
    line = runclient.request(["true"], dict(runclient.SHAPE_DEFAULTS), 0.0, None)
    served.sendall(line)
    handler = threading.Thread(target=runner.Daemon()._handle, args=(daemon_end,), daemon=True)
    handler.start()
    served.settimeout(10)  # the failure this guards against is a wait for ever
    out, err = io.BytesIO(), io.BytesIO()
    code = runclient._print_frames(served, out, err)
    assert code == runner.EXIT_CRASH
    assert "the run daemon failed: ValueError('timeout must be positive" in capsys.readouterr().err
    assert served.recv(1) == b""  # and the daemon hung up
    handler.join(5)
    assert not handler.is_alive()
    served.close()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_that_is_not_positive_seconds_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from ember.cli.main import build_parser

    for command in ("run", "exec"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([command, f"--timeout={value}", "x"])
        assert exit_.value.code == 2
        assert "--timeout" in capsys.readouterr().err
        assert runclient.parse([command, f"--timeout={value}", "x"]) is None  # argparse's call
    assert build_parser().parse_args(["run", "--timeout=0.5", "x"]).timeout == 0.5

"""The run daemon (ember.cli.runner) with real sandboxes: ``ember run``/``ember exec`` give the
same output and exit status through it as in-process, a client that goes away ends its run,
and the daemon stops cleanly. Each test's daemon serves a directory of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.cli import runclient, runner
from tests.integration.conftest import ember_command
from tests.waiting import wait_for

pytestmark = pytest.mark.kvm

SCRIPT = (
    "import sys\nprint('out', sys.argv[1:], __name__, flush=True)\n"
    "print('err', file=sys.stderr)\nsys.exit(3)\n"
)


@pytest.fixture
def daemon_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    directory = tmp_path / "run"
    env = dict(os.environ, EMBER_RUNNER="1", EMBER_RUNNER_DIR=str(directory))
    env.pop("EMBER_SERVER", None)
    yield env
    assert runner.stop(directory), "the run daemon did not stop"
    assert not os.path.exists(runclient.socket_path(directory))


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ember_command(*args), env=env, capture_output=True, text=True, timeout=timeout
    )


def runs_logged(env: dict[str, str]) -> int:
    log = Path(env["EMBER_RUNNER_DIR"]) / runner.LOG
    text = log.read_text() if log.exists() else ""
    return text.count("a run ended")


def wait_for_daemon(env: dict[str, str]) -> None:
    sock = Path(runclient.socket_path(env["EMBER_RUNNER_DIR"]))
    wait_for(sock.exists, 120, "the run daemon's socket")


def test_runs_through_the_daemon_match_runs_in_process(
    daemon_env: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "hello.py"
    script.write_text(SCRIPT)
    alone = cli(dict(daemon_env, EMBER_RUNNER="0"), "run", str(script), "a", "b")
    assert (alone.returncode, alone.stdout, alone.stderr) == (
        3, "out ['a', 'b'] __main__\n", "err\n",
    )  # fmt: skip
    first = cli(daemon_env, "run", str(script), "a", "b")  # no daemon yet: starts one
    assert (first.returncode, first.stdout, first.stderr) == (
        alone.returncode, alone.stdout, alone.stderr,
    )  # fmt: skip
    wait_for_daemon(daemon_env)
    before = runs_logged(daemon_env)
    for _ in range(2):
        again = cli(daemon_env, "run", str(script), "a", "b")
        assert (again.returncode, again.stdout, again.stderr) == (
            alone.returncode, alone.stdout, alone.stderr,
        )  # fmt: skip
    assert runs_logged(daemon_env) == before + 2  # the daemon ran them
    shell = cli(daemon_env, "exec", "--", "sh", "-c", "echo o; echo e >&2; exit 5")
    assert (shell.returncode, shell.stdout, shell.stderr) == (5, "o\n", "e\n")
    assert runs_logged(daemon_env) == before + 3


def test_timeouts_and_missing_programs_report_as_in_process(
    daemon_env: dict[str, str],
) -> None:
    cli(daemon_env, "exec", "--", "true")  # starts the daemon
    wait_for_daemon(daemon_env)
    slow = cli(daemon_env, "exec", "--timeout", "2", "--", "sleep", "30")
    assert slow.returncode == runner.EXIT_TIMEOUT
    assert "ran longer than 2.0 s" in slow.stderr
    missing = cli(daemon_env, "exec", "--", "no-such-program")
    local = cli(dict(daemon_env, EMBER_RUNNER="0"), "exec", "--", "no-such-program")
    assert (missing.returncode, missing.stderr) == (local.returncode, local.stderr)
    assert missing.returncode != 0


def test_a_client_that_goes_away_ends_its_run(daemon_env: dict[str, str], tmp_path: Path) -> None:
    cli(daemon_env, "exec", "--", "true")
    wait_for_daemon(daemon_env)
    marker = "started"
    client = subprocess.Popen(
        ember_command("exec", "--", "sh", "-c", f"echo {marker}; sleep 600"),
        env=daemon_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdout is not None
    assert client.stdout.readline().strip() == marker  # the command runs, in the daemon
    client.send_signal(signal.SIGINT)
    assert client.wait(30) == 130
    log = Path(daemon_env["EMBER_RUNNER_DIR"]) / runner.LOG
    wait_for(lambda: "hung up" in log.read_text(), 60, "the daemon to end the abandoned run")
    after = cli(daemon_env, "exec", "--", "echo", "still serving")
    assert (after.returncode, after.stdout) == (0, "still serving\n")


def test_options_a_spare_cannot_have_run_in_process(daemon_env: dict[str, str]) -> None:
    cli(daemon_env, "exec", "--", "true")
    wait_for_daemon(daemon_env)
    before = runs_logged(daemon_env)
    r = cli(daemon_env, "exec", "--allow", "10.0.0.5:443", "--", "true")
    assert r.returncode == 0, r.stderr
    time.sleep(0.5)
    assert runs_logged(daemon_env) == before

"""Pieces of the kernel build that run without building a kernel."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from ember.errors import BuildError
from ember.images import kernel_build
from ember.images.kconfig import config_mismatches, parse_config
from ember.images.progress import ObjectCounter, Progress
from ember.images.runner import run_logged

FRAGMENT = """\
# comment
CONFIG_SMP=y
CONFIG_MODULES=n
CONFIG_NR_CPUS=8
# CONFIG_IPV6 is not set
"""


def test_parse_config() -> None:
    assert parse_config(FRAGMENT) == {
        "CONFIG_SMP": "y",
        "CONFIG_MODULES": "n",
        "CONFIG_NR_CPUS": "8",
        "CONFIG_IPV6": "n",
    }


def test_config_honoured() -> None:
    dotconfig = "CONFIG_SMP=y\n# CONFIG_MODULES is not set\nCONFIG_NR_CPUS=8\nCONFIG_X=y\n"
    assert config_mismatches(FRAGMENT, dotconfig) == []


def test_config_mismatches_name_the_options() -> None:
    dotconfig = "# CONFIG_SMP is not set\nCONFIG_MODULES=y\nCONFIG_NR_CPUS=64\nCONFIG_IPV6=m\n"
    assert config_mismatches(FRAGMENT, dotconfig) == [
        "CONFIG_SMP (wanted =y, got not set)",
        "CONFIG_MODULES (wanted not set, got =y)",
        "CONFIG_NR_CPUS (wanted =8, got =64)",
        "CONFIG_IPV6 (wanted not set, got =m)",
    ]
    assert config_mismatches("CONFIG_SMP=y\n", "")[0].startswith("CONFIG_SMP")


def test_shipped_fragment_parses() -> None:
    options = parse_config(kernel_build.load_fragment().decode())
    assert options["CONFIG_BLK_DEV_INITRD"] == "y"
    assert options["CONFIG_RD_GZIP"] == "n"


def test_object_counter() -> None:
    counter = ObjectCounter("kernel: make")
    lines = [
        "  CC      kernel/fork.o",
        "  AR      kernel/built-in.a",
        "  LD      vmlinux.o",
        "  HOSTCC  scripts/basic/fixdep",
        "make[1]: Entering directory",
        "  CC [M]  drivers/foo.o",
    ]
    assert [counter.feed(line) for line in lines] == [True, False, True, False, False, True]
    assert counter.count == 3
    assert counter.message() == "kernel: make: 3 objects compiled (CC drivers/foo.o)"


def test_progress_non_tty_prints_periodic_lines() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=False, interval=3600)
    with progress.step("kernel: make"):
        progress.status("kernel: make: 1 objects compiled")  # too soon: swallowed
        progress.status("kernel: make: 2 objects compiled", force=True)
    text = out.getvalue()
    assert "\r" not in text
    assert "1 objects" not in text and "2 objects" in text
    assert "kernel: make ..." in text and "kernel: make: done in" in text


def test_progress_tty_rewrites_one_line() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=True)
    progress.status("working 1", force=True)
    progress.status("working 2", force=True)
    progress.note("finished")
    text = out.getvalue()
    assert text.count("\r\x1b[K") >= 3 and text.endswith("finished\n")
    assert "\n" not in text[: text.index("finished")]


def test_failed_step_reports_failure() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress(out, tty=False).step("thing"):
        raise RuntimeError
    assert "thing: failed after" in out.getvalue()


def test_run_logged_failure_carries_tail_and_log(tmp_path: Path) -> None:
    log_path = tmp_path / "build.log"
    script = "for i in $(seq 1 30); do echo line$i; done; echo oops >&2; exit 3"
    with open(log_path, "wb") as log, pytest.raises(BuildError) as caught:
        run_logged(
            ["sh", "-c", script],
            what="the step",
            cwd=tmp_path,
            log=log,
            log_path=log_path,
            progress=Progress(io.StringIO(), tty=False),
        )
    message = str(caught.value)
    assert "the step failed (exit status 3)" in message
    assert "line30" in message and "oops" in message and "line12\n" in message
    assert "line11\n" not in message
    assert str(log_path) in message
    assert "line1\n" in log_path.read_text()


def test_run_logged_feeds_stdin_and_lines(tmp_path: Path) -> None:
    seen: list[str] = []

    def on_line(line: str) -> str | None:
        seen.append(line)
        return None

    log_path = tmp_path / "log"
    with open(log_path, "wb") as log:
        run_logged(
            ["cat"],
            what="cat",
            cwd=tmp_path,
            log=log,
            log_path=log_path,
            progress=Progress(io.StringIO(), tty=False),
            stdin=b"a\nb\nc",
            on_line=on_line,
        )
    assert seen == ["a", "b"]  # the unterminated last line goes to the tail only
    assert log_path.read_text().endswith("a\nb\nc")


def test_missing_command(tmp_path: Path) -> None:
    with open(tmp_path / "log", "wb") as log, pytest.raises(BuildError, match="cannot run"):
        run_logged(
            ["/nonexistent/tool"],
            what="x",
            cwd=tmp_path,
            log=log,
            log_path=tmp_path / "log",
            progress=Progress(io.StringIO(), tty=False),
        )

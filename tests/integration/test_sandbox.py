"""The product path end to end: Sandbox -> VMM process -> vsock -> guest agent -> back.

One sandbox is shared by most tests (a cold boot costs tens of seconds on
kvm_pvm); the crash test boots its own, which panics while the shared one
keeps answering.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.errors import AgentFileNotFoundError, SandboxCrashed, SandboxTimeout
from ember.protocol import RUN_DIR
from ember.sandbox import Sandbox
from tests.integration.conftest import Images, ember


@pytest.fixture(scope="module")
def sb(images: Images) -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


def test_exec_echo(sb: Sandbox) -> None:
    r = sb.exec(["echo", "hello", "world"], timeout=120)
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"hello world\n", b"")


def test_exit_codes_signals_and_stderr_apart(sb: Sandbox) -> None:
    r = sb.exec("echo out; echo err >&2; exit 3", timeout=120)
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = sb.exec(["sh", "-c", "kill -SEGV $$"], timeout=120)  # a crashing process is a result
    assert r.signal == 11 and r.exit_code is None


def test_timeout_kills_the_process_group_and_the_sandbox_stays_usable(sb: Sandbox) -> None:
    with pytest.raises(SandboxTimeout) as info:
        sb.exec(["sh", "-c", "sleep 1000 & sleep 1000"], timeout=3)
    assert info.value.result is not None and info.value.result.timed_out
    # minbase has no ps: count the sleeps left in /proc (the whole group must be gone)
    r = sb.exec("cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^sleep$'", timeout=120)
    assert r.stdout.strip() == b"0", r
    assert sb.exec(["true"], timeout=120).exit_code == 0


def test_a_script_and_its_input_go_with_the_command(sb: Sandbox) -> None:
    script = b"import sys\nprint(open(sys.argv[1]).read().upper(), __file__)\nraise SystemExit(5)\n"
    r = sb.exec(["python3", "/tmp/job/main.py", "/tmp/job/in.txt"], timeout=120,
                files={"/tmp/job/main.py": script, "/tmp/job/in.txt": b"payload"})  # fmt: skip
    assert (r.exit_code, r.stdout, r.stderr) == (5, b"PAYLOAD /tmp/job/main.py\n", b"")
    assert sb.files.read("/tmp/job/in.txt") == b"payload"


def test_tmp_is_a_tmpfs_of_its_own(sb: Sandbox) -> None:
    """ember-init mounts one (nosuid, nodev, sticky and world-writable, as distributions
    do): a small file's create costs a third of the overlay's in this emulated kernel."""
    mounts = [line.split() for line in sb.files.read("/proc/self/mounts").decode().splitlines()]
    tmp = [m for m in mounts if m[1] == "/tmp"]
    assert len(tmp) == 1 and tmp[0][2] == "tmpfs", tmp
    options = tmp[0][3].split(",")
    assert "nosuid" in options and "nodev" in options, options
    assert sb.files.stat("/tmp").mode & 0o7777 == 0o1777


def test_the_run_scripts_directory_is_in_the_template(images: Images) -> None:
    # A fresh sandbox, before anything ran in it: the agent made it before the snapshot, so
    # that no ember run pays for a mkdir (and its failed create and stat) in its guest.
    with Sandbox() as fresh:
        info = fresh.files.stat(RUN_DIR)
        assert info.is_dir and info.mode & 0o777 == 0o755, info


SPOT_CHECKS = 16  # 4 KiB blocks of the file, read by the guest itself
CONCURRENT_STREAMS = 8


def test_file_round_trip_keeps_every_byte(sb: Sandbox) -> None:
    size = int(os.environ.get("EMBER_TEST_FILE_MIB", "32")) << 20  # ~2 s of CI per MiB
    data = os.urandom(size)
    assert sb.files.write("/tmp/big.bin", io.BytesIO(data)) == size
    # The guest's own view of the file, at the ends and at random places (a transform that
    # the read back would undo cannot hide); the whole file is compared on the way back.
    # A whole-file sha256sum in the guest cost CI ~60 s of emulated kernel copies.
    offsets = [0, size - 4096, *(random.randrange(size >> 12) << 12 for _ in range(SPOT_CHECKS))]
    seen = sb.run_code(
        "import hashlib\n"
        "blocks = []\n"
        "with open('/tmp/big.bin', 'rb') as f:\n"
        f"    for offset in {offsets}:\n"
        "        f.seek(offset)\n"
        "        blocks.append(hashlib.sha256(f.read(4096)).hexdigest())\n"
        "blocks",
        timeout=300,
    )
    assert seen.error is None, seen.error
    expected = [hashlib.sha256(data[o : o + 4096]).hexdigest() for o in offsets]
    assert seen.value == repr(expected)
    out = io.BytesIO()
    assert sb.files.read_into("/tmp/big.bin", out) == size
    assert hashlib.sha256(out.getvalue()).digest() == hashlib.sha256(data).digest()
    assert sb.files.stat("/tmp/big.bin").size == size
    sb.files.remove("/tmp/big.bin")
    with pytest.raises(FileNotFoundError):
        sb.files.read("/tmp/big.bin")


def test_concurrent_exec_streams(sb: Sandbox) -> None:
    """Streams at once on one sandbox: each gets exactly its own output (50 at once through
    the daemon: test_serve_sdk; each stream is a new guest process, ~6 s of CI)."""
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            chunks = [c.data for c in sb.exec_stream(["echo", f"stream-{i}"], timeout=600)]
            results[i] = b"".join(chunks)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT_STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {i: f"stream-{i}\n".encode() for i in range(CONCURRENT_STREAMS)}


def test_run_code_keeps_state_and_survives_a_crashing_worker(sb: Sandbox) -> None:
    assert sb.run_code("x = 6", timeout=300).error is None
    r = sb.run_code("print('hi'); x * 7", timeout=300)
    assert (r.stdout, r.value, r.error) == ("hi\n", "42", None)
    bad = sb.run_code("1 / 0", timeout=300)
    assert bad.error is not None and bad.error.type == "ZeroDivisionError"
    crashed = sb.run_code("import os; os._exit(3)", timeout=300)
    assert crashed.error is not None and crashed.error.type == "WorkerCrashed"
    assert sb.run_code("6 * 7", timeout=300).value == "42"  # a new worker took over


def test_data_channel_delivers_every_frame_in_order(sb: Sandbox) -> None:
    count = 10_000
    code = (
        "from ember.agent import channel\n"
        "ch = channel('frames')\n"
        f"for i in range({count}):\n"
        "    ch.send(i.to_bytes(4, 'little') * 4)\n"
        "ch.close()\n"
    )
    done: list[object] = []
    runner = threading.Thread(target=lambda: done.append(sb.run_code(code, timeout=600)))
    runner.start()
    frames = list(sb.channel("frames", timeout=600))
    runner.join()
    assert len(frames) == count
    assert all(f == i.to_bytes(4, "little") * 4 for i, f in enumerate(frames))


def test_guest_panic_is_sandbox_crashed_and_others_carry_on(sb: Sandbox) -> None:
    with Sandbox() as doomed:
        with pytest.raises(SandboxCrashed) as info:
            doomed.exec(["sh", "-c", "echo c > /proc/sysrq-trigger"], timeout=300)
        assert "panic" in str(info.value).lower() or "panic" in info.value.console_tail.lower()
        with pytest.raises(SandboxCrashed):
            doomed.ping()
    assert sb.exec(["echo", "still here"], timeout=120).stdout == b"still here\n"


def test_ember_run_streams_a_script_and_returns_its_status(images: Images, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import sys\nprint('args', sys.argv[1:])\nprint('oops', file=sys.stderr)\nsys.exit(5)\n"
    )
    result = ember("run", str(script), "a", "b")
    assert result.returncode == 5, result.stderr
    assert result.stdout == "args ['a', 'b']\n"
    assert result.stderr == "oops\n"


def test_a_missing_file_is_the_agents_answer_not_a_crash_to_look_for(
    sb: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FileNotFoundError is an OSError, as a broken connection is; only the latter may be a
    # dead VM worth waiting for (crash_after_failure waits up to 5 s for the VMM to exit).
    looked: list[bool] = []
    real = sb._vmm.crash_after_failure

    def spy() -> SandboxCrashed | None:
        looked.append(True)
        return real()

    monkeypatch.setattr(sb._vmm, "crash_after_failure", spy)
    with pytest.raises(AgentFileNotFoundError):
        sb.files.stat("/no/such/file")
    with pytest.raises(AgentFileNotFoundError):
        sb.files.read("/no/such/file")
    assert looked == []

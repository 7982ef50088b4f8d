"""Both ways a sandbox's VMM process starts, end to end, with the typed config handed over.

A restore is forked by the zygote, which received the config as JSON over its socket; a cold
boot (``boot=True``, and every template build) is a fresh ``python -m ember.vmm.process``
that read it on stdin.  Neither passes a flag: the process's command line says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from ember.sandbox import Sandbox
from ember.zygote import Zygote
from tests.integration.conftest import Images


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")


def test_a_restore_is_forked_by_the_zygote(images: Images) -> None:
    with Sandbox() as sb:
        vmm = sb._vmm.vmm_pid
        assert vmm is not None
        assert _parent(vmm) == Zygote.get()._proc.pid
        assert b"ember.zygote" in b" ".join(_cmdline(vmm))  # a fork: no command line of its own
        assert sb.exec(["echo", "restored"], timeout=120).stdout == b"restored\n"


def test_a_cold_boot_is_a_fresh_interpreter_reading_its_config_on_stdin(images: Images) -> None:
    with Sandbox(boot=True) as sb:
        proc = sb._vmm.proc
        assert proc is not None
        assert _cmdline(proc.pid)[1:] == [b"-m", b"ember.vmm.process"]
        assert os.readlink(f"/proc/{proc.pid}/fd/0") == "/dev/null"  # the config was read
        assert sb.exec(["echo", "booted"], timeout=300).stdout == b"booted\n"

"""Integration tests run the real thing: /dev/kvm, the built guest kernel and initramfs.

Nothing here skips: a machine without KVM or without the images built by
``scripts/setup.sh`` fails loudly, so CI can never pass by testing nothing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember.images import artifact_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ember.sandbox import Sandbox

BOOT_TIMEOUT = 600  # seconds; a boot takes ~15-40 s on kvm_pvm, well under 1 s on hardware


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[
    None, pytest.TestReport, pytest.TestReport
]:  # fmt: skip
    """A failing test's report ends with the logs of the ``ember serve`` daemons that wrote
    during it: what the daemon did (a reap, a crash) is often the only account of a failure
    on a CI machine, where the logs are gone with it."""
    report = yield
    if report.failed:
        from tests.integration.serve_daemon import STARTED

        since = call.start - 1
        for daemon in STARTED:
            with contextlib.suppress(OSError):
                if daemon.log.stat().st_mtime >= since:
                    report.sections.append((f"ember serve log {daemon.log.name}",
                                            daemon.log_tail()))  # fmt: skip
    return report


@dataclass(frozen=True)
class Images:
    kernel: Path
    bzimage: Path
    initrd: Path
    rootfs: Path


@pytest.fixture(scope="session")
def images() -> Images:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.fail("/dev/kvm is not usable: integration tests need KVM")
    return Images(
        artifact_path("kernel"),
        artifact_path("bzimage"),
        artifact_path("initrd"),
        artifact_path("rootfs"),
    )


@pytest.fixture
def template_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A template name no other test (or xdist worker) uses, removed after the test."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    name = f"test-{module}-{uuid.uuid4().hex[:8]}"
    yield name
    ember("template", "rm", name)


def kept_snapshot(name: str) -> Path:
    """Snapshot ``name`` of a fresh sandbox whose worker holds ``kept = 42``; its directory."""
    from ember import templates
    from ember.sandbox import Sandbox

    with Sandbox() as sb:
        sb.run_code("kept = 6*7", timeout=120)
        sb.snapshot(name)
    return templates.templates_root() / name


def ember_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ember.cli.main", *args]


def ember(*args: str, timeout: float = BOOT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run the CLI exactly as a user would, in its own process."""
    return subprocess.run(
        ember_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def meminfo_kib(sb: Sandbox) -> dict[str, int]:
    """The guest's ``/proc/meminfo`` in KiB, read by the run_code worker: no new guest
    process (an exec of ``cat`` costs ~1 s of emulated kernel, and a Python one a pool
    member, which would change the memory being measured)."""
    cell = sb.run_code("print(open('/proc/meminfo').read(), end='')", timeout=120)
    assert cell.error is None, cell
    return {line.split(":")[0]: int(line.split()[1]) for line in cell.stdout.splitlines()}

"""`ember boot` brings the real guest kernel to user space and stops cleanly."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Images, ember

MARKER = "EMBER-USERSPACE-OK"


@pytest.mark.parametrize("kind", ["kernel", "bzimage"])
def test_boot_reaches_userspace_and_exits_cleanly(images: Images, kind: str) -> None:
    kernel = images.kernel if kind == "kernel" else images.bzimage
    result = ember("boot", "--kernel", str(kernel), "--initrd", str(images.initrd))
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARKER)]
    assert lines, result.stdout[-2000:]
    release = lines[0].split()[1]
    assert release.startswith("6.1."), lines[0]
    assert result.stderr == ""


def test_guest_kernel_panic_is_a_crash_with_a_one_line_reason(images: Images) -> None:
    # No init at this path: the kernel panics, and panic=-1 makes it reset at once.
    result = ember(
        "boot",
        "--kernel",
        str(images.kernel),
        "--initrd",
        str(images.initrd),
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 quiet rdinit=/nonexistent init=/nonexistent",
    )
    assert result.returncode == 1, result.stderr
    assert MARKER not in result.stdout
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "kernel panic" in err[0] and "Traceback" not in result.stderr

"""`ember boot --rootfs`: a real Debian root on virtio-blk, a workload, its exit status."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from tests.integration.conftest import BOOT_TIMEOUT, Images, ember, ember_command


def test_python3_from_the_root_file_system(images: Images) -> None:
    result = ember(
        "boot", "--kernel", str(images.kernel), "--rootfs", str(images.rootfs),
        "--", "python3", "-c", "print(6*7)",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    assert result.stdout.splitlines()[-1] == "42", result.stdout[-2000:]
    assert "ember-exit" not in result.stdout  # plumbing stays out of the workload's output


GUEST_SCRIPT = """
set -u
echo "$1" > /dev/vdb && echo disk-written
echo scribble > /dev/vda 2>/dev/null && echo ROOT-WRITABLE || echo root-refused
echo overlay > /etc/ember-test && cat /etc/ember-test
sync
"""


def test_two_vms_share_one_read_only_root_and_write_their_own_disks(
    images: Images, tmp_path: Path
) -> None:
    root_digest = hashlib.sha256(images.rootfs.read_bytes()).hexdigest()
    procs = []
    disks = []
    for name in ("alpha", "beta"):
        disk = tmp_path / f"{name}.img"
        with disk.open("wb") as f:
            f.truncate(1 << 20)
        disks.append(disk)
        argv = ember_command(
            "boot", "--kernel", str(images.kernel), "--rootfs", str(images.rootfs),
            "--disk", str(disk), "--", "sh", "-c", GUEST_SCRIPT, "sh", name,
        )  # fmt: skip
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=BOOT_TIMEOUT) for p in procs]
    for proc, (out, err), disk, name in zip(procs, outputs, disks, ("alpha", "beta"), strict=True):
        text = out.decode(errors="replace")
        assert proc.returncode == 0, err.decode() + text[-2000:]
        lines = text.splitlines()
        assert "disk-written" in lines and "root-refused" in lines and "overlay" in lines, text
        assert disk.read_bytes()[: len(name) + 1] == f"{name}\n".encode()
    # The shared image was never written: the writable layer is per VM.
    assert hashlib.sha256(images.rootfs.read_bytes()).hexdigest() == root_digest


def test_two_vcpus_come_up_and_the_workload_exit_status_is_ember_boots(images: Images) -> None:
    # one boot for both (each costs CI ~20 s of emulated guest kernel)
    result = ember(
        "boot", "--kernel", str(images.kernel), "--rootfs", str(images.rootfs), "--vcpus", "2",
        "--", "sh", "-c", "grep -c ^processor /proc/cpuinfo; exit 7",
    )  # fmt: skip
    assert result.returncode == 7, result.stderr + result.stdout[-2000:]
    assert result.stdout.splitlines()[-1] == "2", result.stdout[-2000:]

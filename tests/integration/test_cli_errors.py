"""Bad input to `ember boot`: one line on stderr, exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import Images, ember


def assert_usage_error(result: object, *needles: str) -> None:
    import subprocess

    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_file_that_is_no_kernel() -> None:
    assert_usage_error(ember("boot", "--kernel", "/etc/hostname"), "not a Linux kernel")


def test_a_missing_kernel(tmp_path: Path) -> None:
    assert_usage_error(ember("boot", "--kernel", str(tmp_path / "vmlinux")), "does not exist")


def test_a_missing_initrd(images: Images, tmp_path: Path) -> None:
    assert_usage_error(
        ember("boot", "--kernel", str(images.kernel), "--initrd", str(tmp_path / "nope")),
        "initrd",
        "does not exist",
    )


@pytest.mark.parametrize(("mem", "needle"), [("8", "from 32 to"), ("0", "from 32 to")])
def test_too_little_memory(images: Images, mem: str, needle: str) -> None:
    assert_usage_error(ember("boot", "--kernel", str(images.kernel), "--mem", mem), needle)


def test_an_initrd_bigger_than_memory(images: Images, tmp_path: Path) -> None:
    big = tmp_path / "big.cpio"
    with big.open("wb") as f:
        f.truncate(40 << 20)
    assert_usage_error(
        ember("boot", "--kernel", str(images.kernel), "--initrd", str(big), "--mem", "32"),
        "does not fit",
    )


def test_bad_cpu_template_and_vcpus(images: Images) -> None:
    assert_usage_error(
        ember("boot", "--kernel", str(images.kernel), "--cpu-template", "nehalem"), "choose one of"
    )
    assert_usage_error(ember("boot", "--kernel", str(images.kernel), "--vcpus", "0"), "--vcpus")


def test_unusable_dev_kvm(images: Images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Point the VMM at a path that is not KVM; the message must say how to fix it.
    monkeypatch.setenv("EMBER_KVM_DEVICE", str(tmp_path / "kvm"))
    assert_usage_error(ember("boot", "--kernel", str(images.kernel)), "does not exist", "kvm")

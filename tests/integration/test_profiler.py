"""The VMM's guest profiler (``profile-start``/``profile-stop``) in a jailed, restored sandbox.

The samples must be real RIPs of this guest: kernel ones inside the kernel's text (the
``vmlinux`` symbol range), user ones below the canonical hole, and a busy user-mode loop must
show up as mostly user-mode samples. Sampling must not break the jail (no thread may be started
after seccomp is on) nor leave the guest stopped when it ends.
"""

from __future__ import annotations

import subprocess

import pytest

from ember import Sandbox
from ember.errors import EmberError

from .conftest import Images

USER_TOP = 0x8000_0000_0000
SPIN = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.5:\n    pass\n"


def kernel_text(vmlinux: str) -> tuple[int, int]:
    addrs = [
        int(line.split()[0], 16)
        for line in subprocess.check_output(["nm", "-n", vmlinux], text=True).splitlines()
        if len(line.split()) == 3 and line.split()[1] in "tT"
    ]
    return min(addrs), max(addrs)


def test_samples_are_this_guests_rips(images: Images) -> None:
    low, high = kernel_text(str(images.kernel))
    with Sandbox() as sb:
        sb.run_code("1")
        control = sb._vmm.control
        control("profile-start", hz=500)
        with pytest.raises(EmberError, match="already running"):
            control("profile-start", hz=500)
        assert sb.run_code(SPIN).error is None
        report = control("profile-stop")
        samples = {int(rip, 16): n for rip, n in report["samples"].items()}
        assert report["total"] == sum(samples.values()) + report["other"] > 50
        kernel = {rip: n for rip, n in samples.items() if rip >= USER_TOP}
        assert all(low <= rip <= high + 0x10000 for rip in kernel), sorted(map(hex, kernel))
        user = sum(n for rip, n in samples.items() if rip < USER_TOP)
        assert user > report["total"] / 2, (user, report["total"])  # the spin is user code
        # sampling stopped, the guest runs on
        assert sb.run_code("6*7").value == "42"
        with pytest.raises(EmberError, match="no profile is running"):
            control("profile-stop")


def test_bad_rates_are_refused(images: Images) -> None:
    with Sandbox() as sb:
        for hz in (0, 1e9, "fast", True):
            with pytest.raises(EmberError):
                sb._vmm.control("profile-start", hz=hz)
        assert sb.run_code("1 + 1").value == "2"  # a refused start changed nothing


def test_kvm_stats_count_what_the_hypervisor_did_for_this_vm(images: Images) -> None:
    # Read in the jailed VMM (the stats fds were opened before the jail, reading them is a
    # pread): the counters must move with this guest's own work and only then.
    with Sandbox() as sb:
        sb.ping()
        control = sb._vmm.control
        before = control("kvm-stats")
        assert {"vm", "vcpus"} <= before.keys()
        assert before["vcpus"]["exits"] > 0 and "pages_4k" in before["vm"]
        sb.exec(["true"], timeout=120)  # a new guest process: kernel work, hence exits
        after = control("kvm-stats")
        assert after["vcpus"]["exits"] > before["vcpus"]["exits"]
        assert after["vcpus"]["insn_emulation"] >= before["vcpus"]["insn_emulation"]
        control("pause")
        paused = control("kvm-stats")
        again = control("kvm-stats")
        assert again["vcpus"]["exits"] == paused["vcpus"]["exits"]  # a stopped guest: no exits
        control("resume")
        assert sb.run_code("6*7").value == "42"

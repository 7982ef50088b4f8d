"""Ember's kernel patches apply cleanly to Debian's linux-source-6.1.

Only the files the patches touch are extracted (the tar.xz is still read to
its end: ~10 s), so a Debian source update that breaks a patch is caught here
instead of minutes into `ember image build`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ember.images import kernel_build

SOURCE = kernel_build.source_path()

pytestmark = pytest.mark.skipif(
    not SOURCE.is_file(), reason=f"needs {SOURCE} (apt-get install linux-source-6.1)"
)


def test_patched_files_parses_headers() -> None:
    patches = kernel_build.load_patches()
    files = [f for _, data in patches for f in kernel_build.patched_files(data)]
    assert files == [
        "arch/x86/kernel/alternative.c",
        "arch/x86/mm/fault.c",
        "arch/x86/kernel/fpu/core.c",
        "include/linux/virtio_vsock.h",
        "include/vdso/datapage.h",
        "kernel/time/timekeeping.c",
        "kernel/time/timekeeping_internal.h",
        "kernel/time/vsyscall.c",
        "lib/vdso/gettimeofday.c",
        "kernel/Kconfig.hz",
        "drivers/misc/Kconfig",
        "drivers/misc/Makefile",
        "drivers/misc/ember_doorbell.c",
        "drivers/char/random.c",
        "kernel/time/timekeeping.c",
        "net/vmw_vsock/virtio_transport.c",
        "kernel/time/timekeeping.c",
        "drivers/char/random.c",
        "include/linux/interrupt.h",
        "kernel/irq/handle.c",
        "drivers/misc/ember_doorbell.c",
        "include/linux/hrtimer.h",
        "fs/timerfd.c",
        "kernel/time/tick-internal.h",
        "kernel/time/hrtimer.c",
        "kernel/time/timekeeping.c",
        "drivers/char/random.c",
        "mm/shmem.c",
        "arch/x86/include/asm/page_64.h",
        "arch/x86/mm/Makefile",
        "arch/x86/mm/ember_clear.c",
        "mm/memory.c",
        "mm/shmem.c",
        "mm/mmap.c",
        "mm/Makefile",
        "mm/ember_lmk.c",
        "kernel/sched/fair.c",
    ]
    created = [f for _, data in patches for f in kernel_build.patched_files(data, created=True)]
    assert created == [
        "drivers/misc/ember_doorbell.c",
        "arch/x86/mm/ember_clear.c",
        "mm/ember_lmk.c",
    ]
    modified = [f for _, data in patches for f in kernel_build.patched_files(data, created=False)]
    assert sorted(modified + created) == sorted(files)
    assert modified.count("drivers/misc/ember_doorbell.c") == 1  # 0013 changes what 0007 made


def test_patches_apply_cleanly(tmp_path: Path) -> None:
    patches = kernel_build.load_patches()
    ours = {f for _, data in patches for f in kernel_build.patched_files(data, created=True)}
    # From the tarball: what the patches modify, but not a file a patch creates (a later
    # patch may modify that one too).
    files = sorted(
        {f for _, data in patches for f in kernel_build.patched_files(data, created=False)} - ours
    )
    subprocess.run(
        [
            "tar",
            "xf",
            str(SOURCE),
            "-C",
            str(tmp_path),
            "--strip-components=1",
            "--wildcards",
            "--no-wildcards-match-slash",
            *(f"*/{f}" for f in files),
        ],
        check=True,
    )
    for f in files:
        assert (tmp_path / f).is_file(), f"{f} is not in {SOURCE}"
    for name, data in patches:
        argv = [*kernel_build.PATCH, "--dry-run"]
        dry = subprocess.run(argv, cwd=tmp_path, input=data, capture_output=True, check=False)
        report = dry.stdout.decode() + dry.stderr.decode()
        assert dry.returncode == 0, f"{name} does not apply:\n{report}"
        assert "fuzz" not in report, f"{name} applies only with fuzz:\n{report}"
        # apply for real so that a later patch sees the earlier ones, as in the build
        subprocess.run(
            kernel_build.PATCH, cwd=tmp_path, input=data, check=True, capture_output=True
        )


def test_the_kernels_view_of_the_region_header_is_the_vmms() -> None:
    """Patch 0011 reads the clock pair from the shared region's header in C; its layout is
    :mod:`ember.ring`'s, which the VMM writes. C cannot import Python, so they are compared:
    a header change in one that the other misses would make the kernel skip (or misread)
    the pair."""
    import re

    from ember import ring

    text = dict(kernel_build.load_patches())[
        "0011-timekeeping-a-restored-guest-takes-the-hosts-clock.patch"
    ].decode()
    defines = {
        name: int(value, 0)
        for name, value in re.findall(
            r"^\+#define\s+(EMBER_SHM_\w+)\s+(0x[0-9a-f]+|\d+)", text, re.M
        )
    }
    assert defines == {
        "EMBER_SHM_MAGIC": ring.MAGIC,
        "EMBER_SHM_VERSION": ring.VERSION,
        "EMBER_SHM_TSC": ring.H_TSC,
        "EMBER_SHM_TSC_REALTIME": ring.H_TSC_REALTIME,
        "EMBER_SHM_TSC_KHZ": ring.H_TSC_KHZ,
    }
    # and it checks magic and version at the words the VMM puts them in
    assert ring.H_MAGIC == 0 and "header[0]) != EMBER_SHM_MAGIC" in text
    assert ring.H_VERSION == 1 and "header[1]) != EMBER_SHM_VERSION" in text

"""Which files the template reads into the guest's page cache (ember.agent.pagecache)."""

from __future__ import annotations

import os
from pathlib import Path

from ember.agent import pagecache


def _tree(root: Path) -> None:
    """A small merged-/usr Debian: two packages listed by dpkg, one multi-arch."""
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    usr_bin, usr_lib = root / "usr/bin", root / "usr/lib/x86_64-linux-gnu"
    usr_lib.mkdir(parents=True)
    (usr_lib / "gconv").mkdir()
    usr_bin.mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    (usr_bin / "ls").write_bytes(b"\x7fELF" + bytes(5000))
    (usr_bin / "cat").write_bytes(b"\x7fELF" + bytes(100))
    (usr_bin / "dir").symlink_to("ls")
    (usr_bin / "huge").write_bytes(b"")
    os.truncate(usr_bin / "huge", pagecache.MAX_FILE + 1)
    (root / "usr/share/doc").mkdir(parents=True)
    (root / "usr/share/doc/README").write_text("not a binary")
    (usr_lib / "libc.so.6").write_bytes(bytes(3000))
    (usr_lib / "gconv/UTF-16.so").write_bytes(bytes(10))
    (usr_lib / "libc.a").write_bytes(bytes(10))
    (info / "coreutils.list").write_text(
        "/.\n/bin\n/bin/ls\n/bin/cat\n/usr/bin/ls\n/usr/bin/dir\n/usr/bin/huge\n"
        "/usr/bin/gone\n/usr/share/doc/README\n"
    )
    (info / "libc6:amd64.conffiles").write_text("/usr/bin/cat\n")  # not the file list
    (info / "libc6:amd64.list").write_text(
        "/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu/libc.so.6\n"
        "/usr/lib/x86_64-linux-gnu/libc.so.6\n/usr/lib/x86_64-linux-gnu/gconv/UTF-16.so\n"
        "/usr/lib/x86_64-linux-gnu/libc.a\n/usr/bin/cat\n"
    )


def _names(paths: list[str], root: Path) -> list[str]:
    return ["/" + os.path.relpath(p, root) for p in paths]


def test_binaries_and_libraries_once_each_and_nothing_else(tmp_path: Path) -> None:
    _tree(tmp_path)
    got = _names(
        list(pagecache.files_of(["coreutils", "absent"], ["libc6"], str(tmp_path))), tmp_path
    )
    # /bin/ls, /usr/bin/ls and /usr/bin/dir are one file; /lib's libc is /usr/lib's; the huge
    # file, a missing one, docs, gconv modules, a static archive and a library package's
    # binary are not warmed, nor is the conffiles list read as a file list.
    assert got == ["/bin/ls", "/bin/cat", "/lib/x86_64-linux-gnu/libc.so.6"]


def test_warm_counts_what_it_read_and_skips_what_it_cannot_open(tmp_path: Path) -> None:
    _tree(tmp_path)
    paths = list(pagecache.files_of(["coreutils"], ["libc6"], str(tmp_path)))
    warmed = pagecache.warm([*paths, str(tmp_path / "usr/bin/gone")])
    assert warmed == pagecache.Warmed(files=3, nbytes=5004 + 104 + 3000)


def test_no_dpkg_database_warms_nothing(tmp_path: Path) -> None:
    assert list(pagecache.files_of(root=str(tmp_path))) == []
    assert pagecache.warm([]) == pagecache.Warmed(0, 0)
